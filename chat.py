"""Chat with a trained LLaVA about an image, in the terminal.

    python chat.py --image photo.jpg                 # the newest trained model (runs/latest)
    python chat.py --model runs/finetune-.../model   # any supported layout: run folder, HF LLaVA, XTuner, official
    python chat.py                                   # text-only
    python chat.py --model runs/internlm2-sft-qlora  # a text-only run (train.py --stage sft): its template
    python chat.py --model merged --template internlm2_chat   # a plain LLM folder names no template: say which
    python chat.py --model llava-xtuner --llm LLM --vision CLIP  # XTuner's layout from elsewhere: name the bases
    python chat.py --serve --port 8000               # an OpenAI-compatible API and a chat page (extras/serve.py)

One line is one message. Commands: RESET (new conversation), EXIT, IMAGE <path> (new conversation about another
image). Template, vision tower, projector and select layer come from the model folder (extras/loader.py reads every
layout), so no other flag is needed beyond what a folder cannot know. Text typed in a message, `<image>` included,
stays text: only the attached image becomes image positions.

Each turn is prefilled on top of the KV cache of the previous turns (only the new tokens are computed, unlike
XTuner's chat, which re-encodes the whole history every turn). Sampling defaults are XTuner's (temperature 0.1,
top-k 40, top-p 0.75, up to 2048 new tokens); generation stops at <|eot_id|> / <|end_of_text|>, and special tokens
are never printed. A text-only model (no vision tower) chats the same way, without images.
"""

import argparse
import os
import sys
import time

import torch

import clip
import data
from extras import loader
from extras.fast_inference import GraphedDecodeStep, compile_for_decoding, fuse_projections, unfusable_projections
from model import generate


class Conversation:
    """The running conversation: what is in the KV cache, and how to add a turn to it."""

    def __init__(self, model, tok, cfg, args, out=sys.stdout):
        self.model, self.tok, self.cfg, self.args, self.out = model, tok, cfg, args, out
        self.template = data.get_template(cfg.get("template", "llama3_chat"))
        self.stop_ids = data.stop_token_ids(tok, self.template)
        self.stop_ids += [i for i in tok.stop_ids if i not in self.stop_ids]
        # what follows an answer in the history: the template's separator (trusted template text), and before it the
        # suffix / EOS that closes an answer cut off by --max-new-tokens (llama3_chat: <|eot_id|>, no separator)
        sep = self.template.sep
        self.sep_ids = tok.encode_with_specials(sep) if sep else []
        self.close_ids = data.encode_reply(tok, self.template, "")  # suffix or EOS, then the separator
        self.device = model.llm.embed_tokens.weight.device
        self.step_fn, self.sync_every = None, 1
        if args.compile and self.device.type != "cuda":
            print("(--compile is for GPUs; running eager on CPU)", file=out)
        elif args.compile is not False and self.device.type == "cuda":  # on by default on a GPU
            # q/k/v and gate/up each one matrix (an adapter keeps LoRA / NF4 layers apart), compiled blocks with
            # split-KV decode attention, the step replayed from a CUDA graph, tokens to the host 4 at a time
            if not unfusable_projections(model.llm):
                fuse_projections(model.llm)
            compile_for_decoding(model.llm)
            self.step_fn, self.sync_every = GraphedDecodeStep(), 4
        self.image = None
        self.reset()

    def reset(self):
        self.cached = 0          # tokens already in the KV cache
        self.carry = []          # the last generated token (never fed yet) and what closes its answer
        self.turns = 0
        self.prefilled = []      # tokens prefilled per turn (shown by --stats; tested)

    def set_image(self, path):
        if self.model.vision is None:
            print(f"[this is a text-only model (no vision tower): cannot use image {path}]", file=self.out)
            return False
        try:
            if not os.path.isfile(path):
                raise FileNotFoundError("no such file")
            img = clip.load_image(path)
        except (OSError, clip.ImageError) as e:
            print(f"[cannot use image {path}: {e}; the chat goes on without it]", file=self.out)
            return False
        self.image = self.pixels(img)
        self.reset()
        return True

    def pixels(self, img):
        """A PIL image as the model was trained on it: (1, 3, S, S), padded to a square or cropped per the folder."""
        return clip.preprocess(img, self.cfg.get("image_size", 336), self.cfg.get("image_mode", "pad") == "pad")[None]

    def ask(self, text):
        first = self.turns == 0
        # the attached image opens the first turn (as XTuner's chat puts it); typed text, `<image>` included, stays
        # text: only the first placeholder, the one put here, becomes image positions
        image = first and self.image is not None
        ids = data.encode_prompt(self.tok, self.template, "<image>\n" + text if image else text,
                                 system=self.args.system if first else None, first_turn=first,
                                 image_tokens=self.cfg.get("image_tokens", 576), images=int(image))
        if not first:
            # the previous answer's last token was sampled but never fed: it opens this turn's prefill
            ids = self.carry + ids
        pixels = None
        if first and self.image is not None:
            pixels = self.image.to(self.device)
        need = self.cached + len(ids) + self.args.max_new_tokens
        if need > self.args.context:
            if first:
                print(f"[this message needs {need} tokens with --max-new-tokens; the context is {self.args.context}: "
                      "raise --context or lower --max-new-tokens]", file=self.out)
                return []
            print(f"[the conversation reached the context of {self.args.context} tokens; starting a new one]",
                  file=self.out)
            self.reset()
            return self.ask(text)
        self.prefilled.append(len(ids))

        printer = _Streamer(self.tok, self.out, self.stop_ids)
        t0 = time.perf_counter()
        first_token = []

        def on_token(row, t):
            if not first_token:
                first_token.append(time.perf_counter())
            printer.push(t)

        new = self.answer(ids, pixels, on_token, self.cached, self.args.seed + self.turns)
        t1 = time.perf_counter()
        printer.flush()
        print(file=self.out)
        self.cached += len(ids) + len(new) - 1
        # the last token was sampled but not fed; it opens the next prefill, with what the template puts after it
        ended = new[-1] in self.stop_ids
        self.carry = [new[-1]] + (self.sep_ids if ended else self.close_ids)
        self.turns += 1
        if self.args.stats and first_token:
            ttft = first_token[0] - t0
            rate = (len(new) - 1) / (t1 - first_token[0]) if len(new) > 1 and t1 > first_token[0] else 0.0
            print(f"[prefill {len(ids)} tokens | time to first token {ttft * 1000:.0f} ms | "
                  f"{len(new)} tokens | {rate:.1f} tok/s]", file=self.out)
        return new

    def answer(self, ids, pixels, on_token, cache_offset=0, seed=0, **sampling):
        """The new tokens answering `ids` (after `cache_offset` cached ones), with this session's stop ids, compiled
        step and context; `sampling` (temperature, top_k, top_p, max_new_tokens) overrides the flags' values."""
        s = {k: getattr(self.args, k) for k in ("temperature", "top_k", "top_p", "max_new_tokens")} | sampling
        cache_len = cache_length(cache_offset + len(ids) + s["max_new_tokens"], self.args.context)
        return generate(self.model, [ids], pixels, **s, stop_ids=self.stop_ids, on_token=on_token,
                        cache_offset=cache_offset, max_cache_len=cache_len, step_fn=self.step_fn,
                        generator=torch.Generator(device=self.device).manual_seed(seed), sync_every=self.sync_every)[0]


def cache_length(need, context):
    """KV cache slots for a conversation that needs `need`: a power of two from 1,024, at most the context. Each
    decode step reads the whole cache, so an 8,192-slot cache for a 900-token chat would read 8x the keys and
    values it needs (1 GB per token at 8B); powers of two keep the shapes, so the compiled blocks and the graph,
    few: a conversation that outgrows its cache gets one twice as long (model.generate keeps its history)."""
    return min(context, max(1024, 1 << (need - 1).bit_length()))


class _Streamer:
    """Prints tokens as they come, holding back bytes that do not yet form whole UTF-8 characters.

    New tokens are decoded behind the tokens printed last, whose own text is then cut off: sentencepiece drops the
    space that starts a word's piece ("▁cat") when that piece opens the decoded text, so pieces decoded one by
    one would print "thecat"."""

    def __init__(self, tok, out, stop_ids):
        self.tok, self.out, self.stop_ids = tok, out, set(stop_ids)
        self.pending, self.last = [], []  # tokens not printed yet; the tokens printed last (context for spaces)

    def _text(self):
        head = self.tok.decode(self.last)
        text = self.tok.decode(self.last + self.pending)
        return text[len(head):] if text.startswith(head) else self.tok.decode(self.pending)

    def push(self, t):
        if t in self.stop_ids or self.tok.is_special(t):
            return
        self.pending.append(t)
        text = self._text()
        if not text.endswith("\ufffd"):
            self.out.write(text)
            self.out.flush()
            self.last, self.pending = self.pending, []

    def flush(self):
        if self.pending:
            self.out.write(self._text())
            self.last, self.pending = self.pending, []


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    loader.add_model_arguments(p)
    p.add_argument("--image", default=None, help="image to talk about (omit for a text-only chat)")
    p.add_argument("--system", default=None, help="system prompt (none by default, as in training)")
    p.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40, help="sample from the k likeliest tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=0.75,
                   help="sample from the likeliest tokens whose probabilities reach p (1 = all)")
    p.add_argument("--max-new-tokens", type=int, default=2048)
    p.add_argument("--context", type=int, default=8192,
                   help="the longest conversation (tokens); the KV cache grows to it as needed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32", "fp16"],
                   help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="on by default on a GPU (--no-compile: eager): fuse the q/k/v and gate/up projections (not "
                        "with LoRA / NF4 layers), compile the decoder blocks (batch-1 products tuned for this GPU, "
                        "split-KV decode attention) and replay each decode step from a CUDA graph (the first answer "
                        "waits for the compilation)")
    p.add_argument("--stats", action="store_true", help="print time to first token and tokens/s after each answer")
    p.add_argument("--prompt", action="append", default=None,
                   help="answer these messages (repeatable) and exit, instead of reading stdin")
    p.add_argument("--serve", action="store_true",
                   help="serve an OpenAI-compatible HTTP API and a chat page instead (extras/serve.py)")
    p.add_argument("--host", default="127.0.0.1", help="--serve: address to bind (another host can reach 0.0.0.0)")
    p.add_argument("--port", type=int, default=8000, help="--serve: port (0 = any free one)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.context < 2:
        p.error("--max-new-tokens must be at least 1 and --context at least 2")
    if not 0.0 < args.top_p <= 1.0 or args.top_k < 0:
        p.error("--top-p must be in (0, 1] and --top-k at least 0 (0 = no top-k filter)")
    return args


def main(argv=None, stdin=sys.stdin, out=sys.stdout):
    args = parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    try:
        model, tok, cfg = loader.load_from_args(args, dtype=dtype, device=args.device)
    except loader.LoadError as e:
        print(f"chat.py: {e}", file=sys.stderr)
        return 2
    where = args.model or "runs/latest"
    if args.image and model.vision is None:
        print(f"{where} is a text-only model (no vision tower): leave --image out", file=sys.stderr)
        return 2
    chat = Conversation(model, tok, cfg, args, out)
    if args.serve:  # the flags' sampling values are the requests' defaults
        from extras import serve
        return serve.run(chat, _Streamer, args.host, args.port, name=str(loader.model_path(args.model)))
    if args.image:
        chat.set_image(args.image)
    interactive = args.prompt is None and stdin.isatty()
    if interactive:
        print("One line per message. RESET: new conversation, IMAGE <path>: new image, EXIT: quit.", file=out)
    lines = iter(args.prompt) if args.prompt is not None else stdin
    while True:
        if interactive:
            print("\n>>> ", end="", file=out, flush=True)
        line = next(lines, None)
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text == "EXIT":
            break
        if text == "RESET":
            chat.reset()
            print("[new conversation]", file=out)
            continue
        if text.startswith("IMAGE "):
            if chat.set_image(text[6:].strip()):
                print(f"[new conversation about {text[6:].strip()}]", file=out)
            continue
        chat.ask(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
