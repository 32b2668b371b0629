"""train.py at real model sizes with neither weights nor data, for throughput, memory and scaling measurements.

    deepspeed --num_gpus 1 bench/train_synthetic.py @recipes/pretrain.args --llm llama-3-8b \
        --vision clip-vit-l-14-336 --synthetic 20000 --max-length 640 --max-steps 30 --out OUT
    torchrun --nproc_per_node 2 bench/train_synthetic.py ...                           (several GPUs)

Every flag is train.py's, plus --synthetic N (and --plain-lora-dropout, for comparison), with three differences, each a seam
of train.train:
- --llm / --vision may name a size (llama.CONFIGS, clip.CONFIGS: llama-3-8b, clip-vit-l-14-336, tiny) as well as a
  folder, and the weights are random (the constructors' initialisation: Llama's N(0, 0.02)), drawn on the GPU in the
  training dtype, so an 8B model needs neither a download nor an fp32 copy;
- the data are N synthetic samples of exactly --max-length positions (SyntheticData; the recipe's --data is
  replaced and no tokenizer is read, so there are no eval prompts);
- nothing is saved: no checkpoint (an 8B full finetune's is ~100 GB of fp32 weights and Adam moments), no model/.
The run folder still gets args.json and metrics.jsonl (tokens/s, samples/s, MFU, peak memory per step).
"""

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules

import clip  # noqa: E402
from extras import datasets  # noqa: E402
import llama  # noqa: E402
import train  # noqa: E402
from extras.checkpoint import empty_model  # noqa: E402
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402
from weights import read_json, write_json  # noqa: E402


class SyntheticData(datasets.BaseDataset):
    """N samples of exactly `length` positions, the same for a given index and seed on every rank.

    Each is one random image (image_tokens positions after the first token) then random text ids, the second half of
    the text supervised (as a caption or an answer would be), shaped as data.py's items, so the training step, and
    its speed, are those of real data of that length."""

    name = "synthetic data"

    def __init__(self, n, length, image_tokens, image_size, vocab_size, seed=0):
        text = length - image_tokens
        if text < 4:
            raise SystemExit(f"--synthetic: --max-length {length} leaves no room for text after the {image_tokens} "
                             f"image positions; use at least {image_tokens + 4}")
        self.n, self.length, self.text, self.image_tokens, self.image_size = n, length, text, image_tokens, image_size
        self.vocab, self.seed = min(vocab_size, 128000), seed  # Llama-3's 128,000 ordinary ids: no control token
        self.stats = {"records": n, "bad_record": 0, "too_long": 0, "no_supervised": 0, "truncated_at_turn": 0,
                      "truncated_in_answer": 0}
        self.modality_lengths = np.full(n, length if image_tokens else -length)  # one length; negative: text-only

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        text = torch.randint(0, self.vocab, (self.text,), generator=g)
        image = torch.full((self.image_tokens,), IMAGE_TOKEN_INDEX)
        input_ids = torch.cat([text[:1], image, text[1:]])  # (length,)
        labels = input_ids.clone()
        labels[: self.length - self.text // 2] = IGNORE_INDEX
        # already "normalised"; a text-only run (image_tokens 0) has no image
        pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=g) if self.image_tokens else None
        return {"id": f"synthetic-{i}", "input_ids": input_ids, "labels": labels, "pixel_values": pixels,
                "replaced": []}


def size_folder(name, cls, sizes, root):
    """A folder holding only the config.json of size `name` (e.g. llama.LlamaConfig, llama.CONFIGS), which train.py
    reads as it reads a real checkpoint's; a folder with a config.json is returned as it is."""
    if (Path(name) / "config.json").is_file():
        return name
    if name not in sizes:
        raise SystemExit(f"{name}: neither a folder with a config.json nor a size name ({', '.join(sizes)})")
    write_json(Path(root) / name / "config.json", cls.from_name(name).to_hf_config())
    return str(Path(root) / name)


def random_model(cfg, dtype, device):
    """The base model of cfg's shapes with random weights. They are drawn on the GPU even where train.py would load
    an NF4 LLM into CPU memory first (a CPU takes minutes to draw 8B numbers); the bf16 LLM then exists whole on the
    GPU until quantization replaces it matrix by matrix (16 GB at 8B)."""
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return empty_model(cfg, dtype, device)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    p.add_argument("--synthetic", type=int, required=True, metavar="N", help="samples of --max-length positions")
    p.add_argument("--plain-lora-dropout", action="store_true",
                   help="leave LoRA's dropout to nn.Dropout (train.py packs its masks: extras/lora_dropout.py)")
    ours, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    if ours.plain_lora_dropout:
        train.pack_lora_dropout = lambda model: 0
    with tempfile.TemporaryDirectory() as sizes:
        args = train.parse_args([*rest, "--data", f"<{ours.synthetic} synthetic samples>"])
        if args.eval_image or (args.stage == "sft" and args.eval_prompt):
            raise SystemExit("eval prompts need a tokenizer and real data: leave --eval-image / --eval-prompt out")
        args.llm = size_folder(args.llm, llama.LlamaConfig, llama.CONFIGS, Path(sizes) / "llm")
        if args.vision is not None:
            args.vision = size_folder(args.vision, clip.CLIPConfig, clip.CONFIGS, Path(sizes) / "vision")
        cfg = train.model_config(args)
        vocab = llama.LlamaConfig.from_hf_config(read_json(Path(args.llm) / "config.json")).vocab_size
        ds = SyntheticData(ours.synthetic, args.max_length, cfg["image_tokens"], cfg.get("image_size", 0), vocab,
                           args.seed)
        return train.train(args, base=random_model, dataset=ds, save=False)


if __name__ == "__main__":
    main()
