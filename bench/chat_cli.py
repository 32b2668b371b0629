"""Chat speed as a user gets it: `chat.py` itself, run as a subprocess on an 8B model folder, against transformers'
LlavaForConditionalGeneration on the same folder, prompt and picture (batch 1, one image + a ~40-token question,
greedy, bf16, 256 new tokens).

    python bench/chat_cli.py write DIR --tokenizer tokenizer.model   # random-weight 8B LLaVA, HF layout (16.7 GB)
    python bench/chat_cli.py ours DIR [--extra "--no-compile"]       # chat.py DIR: its own --stats line per answer
    python bench/chat_cli.py ours DIR --variant before               # chat.py compiled another way (chat_variant.py)
    python bench/chat_cli.py hf DIR --mode eager                     # generate(), dynamic cache (XTuner's chat)
    python bench/chat_cli.py hf DIR --mode static-compile            # static cache + torch.compile'd decoding

`ours` sends `--repeat` questions to one chat.py process, each after RESET (a new conversation about the same
picture), and reads the time to first token and tokens/s that `chat.py --stats` prints; the first answers include
compilation and are reported apart. `hf` times the same token ids (our template, the image's positions given
transformers' image id) with a streamer: TTFT from the generate call to the first new token on the host, decode
rate over the rest. Random weights rarely emit a stop token; transformers gets min_new_tokens so it never stops
early, and chat.py's token count is printed with each answer. One JSON line per result goes to --out.
"""

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

QUESTION = ("Look at the picture carefully and describe every object you can see in it, where each one is, what "
            "colour it has, and what the people in it seem to be doing right now.")
STATS = re.compile(r"\[prefill (\d+) tokens \| time to first token (\d+) ms \| (\d+) tokens \| ([\d.]+) tok/s\]")


def picture(path, size=336):
    from PIL import Image
    g = Image.linear_gradient("L").resize((size, size))
    Image.merge("RGB", (g, g.rotate(90), Image.new("L", g.size, 128))).save(path)
    return path


def emit(out, **rec):
    rec.update(device=C.device_name("cuda" if torch.cuda.is_available() else "cpu"), date=time.strftime("%Y-%m-%d"))
    line = json.dumps(rec)
    print(line, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")


def write(args):
    import convert
    from extras.tokenizer_files import load_model_file

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    net = C.build_ours(args.tiny, device).cpu()
    tok = load_model_file(args.tokenizer)
    t = time.perf_counter()
    convert.write_hf(net, tok, {"template": "llama3_chat", "image_mode": "pad"}, Path(args.dir), torch.bfloat16,
                     5_000_000_000)
    print(f"wrote {args.dir} in {time.perf_counter() - t:.1f} s")


def ours(args):
    image = picture(Path(args.dir) / "probe.png")
    stdin = "".join(f"{QUESTION}\nRESET\n" for _ in range(args.repeat))
    script = ["bench/chat_variant.py", args.variant] if args.variant else ["chat.py"]
    cmd = [sys.executable, *script, "--model", args.dir, "--image", str(image), "--temperature", "0",
           "--max-new-tokens", str(args.new_tokens), "--stats", *args.extra.split()]
    t = time.perf_counter()
    run = subprocess.run(cmd, input=stdin, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    wall = time.perf_counter() - t
    stats = [tuple(float(x) for x in m.groups()) for m in STATS.finditer(run.stdout)]
    if run.returncode or not stats:
        sys.exit(f"chat.py failed (rc {run.returncode}):\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    warm = stats[args.warmup:]
    variant = " ".join(filter(None, [args.variant, args.extra])) or "default"
    emit(args.out, bench="chat_cli", side="ours", variant=variant,
         prefill=int(stats[0][0]), new_tokens=[int(s[2]) for s in stats],
         first_answers=[{"ttft_ms": s[1], "tok_s": s[3]} for s in stats[:args.warmup]],
         ttft_ms=statistics.median(s[1] for s in warm), tok_s=statistics.median(s[3] for s in warm),
         runs=len(warm), process_wall_s=round(wall, 1))


class Clock:
    """A transformers streamer that keeps the host time of every new token (the first put() is the prompt)."""

    def __init__(self):
        self.t0, self.times, self.seen_prompt = time.perf_counter(), [], False

    def put(self, value):
        if self.seen_prompt:
            self.times.append(time.perf_counter())
        self.seen_prompt = True

    def end(self):
        pass


def hf(args):
    import clip
    import data
    from extras.tokenizer_files import load_tokenizer
    from PIL import Image
    from transformers import LlavaForConditionalGeneration

    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    net = LlavaForConditionalGeneration.from_pretrained(args.dir, dtype=torch.bfloat16).to(device).eval()
    tok = load_tokenizer(args.dir)
    image_id = net.config.image_token_index
    n = net.config.image_seq_length
    ids = data.encode_prompt(tok, "llama3_chat", "<image>\n" + QUESTION, image_tokens=n, images=1)
    ids = torch.tensor([[image_id if i == data.IMAGE_TOKEN_INDEX else i for i in ids]], device=device)
    size = net.config.vision_config.image_size
    pixels = clip.preprocess(Image.open(picture(Path(args.dir) / "probe.png")), size)[None].to(device, torch.bfloat16)
    kw = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    if args.mode == "static-compile":
        kw.update(cache_implementation="static")  # transformers compiles the decoding forward for a static cache
    results = []
    with torch.no_grad():
        for _ in range(args.repeat):
            clock = Clock()
            net.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), streamer=clock,
                         **kw)
            results.append(((clock.times[0] - clock.t0) * 1e3,
                            (len(clock.times) - 1) / (clock.times[-1] - clock.times[0])))
    warm = results[args.warmup:]
    emit(args.out, bench="chat_cli", side="hf", variant=args.mode, prefill=ids.shape[1],
         first_answers=[{"ttft_ms": a, "tok_s": b} for a, b in results[:args.warmup]],
         ttft_ms=statistics.median(a for a, _ in warm), tok_s=statistics.median(b for _, b in warm), runs=len(warm))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["write", "ours", "hf"])
    p.add_argument("dir")
    p.add_argument("--tokenizer", help="write: Meta's Llama-3 tokenizer.model")
    p.add_argument("--tiny", action="store_true", help="tiny sizes on the CPU: for checking the script")
    p.add_argument("--extra", default="", help="ours: more chat.py flags, e.g. '--no-compile'")
    p.add_argument("--variant", default="", help="ours: run bench/chat_variant.py VARIANT instead of chat.py")
    p.add_argument("--mode", default="eager", choices=["eager", "static-compile"], help="hf: how transformers decodes")
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeat", type=int, default=5, help="answers timed (each a new conversation)")
    p.add_argument("--warmup", type=int, default=2, help="first answers reported apart (compilation)")
    p.add_argument("--out", default="", help="append JSON lines here")
    args = p.parse_args()
    {"write": write, "ours": ours, "hf": hf}[args.what](args)


if __name__ == "__main__":
    main()
