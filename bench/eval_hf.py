"""eval_mmbench.py's questions answered by transformers' LlavaForConditionalGeneration instead of our model: the
same TSVs, prompts (our template's token ids, the image's positions given transformers' image id), pictures (padded
to square) and answer files, and the same "answered N questions in T s" line, so questions/s compare one to one.

    python bench/eval_hf.py --model DIR --data eval.tsv --batch-size 1 --max-new-tokens 8 --out OUT   # as XTuner
    python bench/eval_hf.py --model DIR --data eval.tsv --batch-size 32 --max-new-tokens 8 --out OUT  # batched

XTuner's MMBench tool asks one question at a time (generate with the dynamic cache, greedy): --batch-size 1. The
batched run left-pads the prompts with an attention mask, transformers' way of batching generation. Random weights
rarely emit a stop token; min_new_tokens makes every answer max_new_tokens long, as ours are on such a model.
Takes eval_mmbench.py's flags; the model folder is the HF layout (convert.py --to hf, bench/chat_cli.py write).
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import clip  # noqa: E402
import data  # noqa: E402
import eval_mmbench  # noqa: E402
from extras.tokenizer_files import load_tokenizer  # noqa: E402

TEMPLATE = "llama3_chat"  # the template bench/chat_cli.py writes into its folder


def load_hf(args, device, dtype):
    from transformers import LlavaForConditionalGeneration

    net = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device).eval()
    tok = load_tokenizer(args.model)
    template = data.get_template(TEMPLATE)
    stop_ids = data.stop_token_ids(tok, template)
    image_id, n = net.config.image_token_index, net.config.image_seq_length
    size = net.config.vision_config.image_size

    def generate_fn(prompts, images):
        rows = [[image_id if i == data.IMAGE_TOKEN_INDEX else i
                 for i in data.encode_prompt(tok, template, p, image_tokens=n, images=1)] for p in prompts]
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), stop_ids[0], dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, r in enumerate(rows):  # left padding
            ids[i, T - len(r):], mask[i, T - len(r):] = torch.tensor(r), 1
        pixels = torch.stack([clip.preprocess(im, size, pad_to_square=True) for im in images])
        with torch.inference_mode():
            out = net.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                               pixel_values=pixels.to(device, dtype), max_new_tokens=args.max_new_tokens,
                               min_new_tokens=args.max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                               pad_token_id=stop_ids[0])
        return [tok.decode(o[T:].tolist(), skip_special=True).strip() for o in out]

    return generate_fn, {"template": TEMPLATE, "image_size": size, "image_tokens": n}


if __name__ == "__main__":
    try:
        eval_mmbench.main(load_fn=load_hf)
    except eval_mmbench.EvalError as e:
        sys.exit(f"eval_hf: {e}")
