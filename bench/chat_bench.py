"""Inference benchmark: time to first token and decode speed of one chat (batch 1, one image + 40 text tokens,
256 new tokens, greedy, bf16), and batched MMBench-style eval throughput (one image + 60..100 text tokens per
question, left-padded batches of 16 and 32, 8 new tokens each: an MMBench answer is a letter and a few words).

    python bench/chat_bench.py --side ours      # model.generate: eager decode steps, and CUDA-graph replayed steps
    python bench/chat_bench.py --side hf        # LlavaForConditionalGeneration.generate (dynamic cache, eager)
    python bench/chat_bench.py --side ours --variants compiled_sync8,compiled_fused_sync8 \
        --profile                               # round 3: unfused vs fused projections, kernel tables

Random weights never emit a stop token by design here: ours gets no stop ids and HF gets min_new_tokens, so every
run generates exactly the requested number of tokens. TTFT = from the generate call to the first new token on the
host (prefill: CLIP + projector + LLM over the prompt, then one sample), median of 5.
"""

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import model as M  # noqa: E402
from extras.fast_inference import GraphedDecodeStep, compile_for_decoding, fuse_projections  # noqa: E402


def extra_args(p):
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--eval-batches", default="16,32", help="batch sizes of the eval timing ('': none)")
    p.add_argument("--eval-new-tokens", type=int, default=8)
    p.add_argument("--profile", nargs="?", const="all", default="",
                   help="ours: after a variant's timings, time 16 decode steps and print their top kernels per step "
                        "(comma-separated variants; a bare --profile: every variant)")
    p.add_argument("--variants", default="eager,cuda_graph,cuda_graph_sync8,compiled_sync8",
                   help="ours, run in this order on one model; a name is words joined by _: eager (no graph) or "
                        "cuda_graph (GraphedDecodeStep) or compiled (compile_for_decoding + compiled CLIP layers, "
                        "and GraphedDecodeStep), then optionally fused (Llama.fuse_projections), sync8 "
                        "(generate(sync_every=8)). Compiling and fusing last for good, so variants without them "
                        "come first, e.g. compiled_sync8,compiled_fused_sync8")


VARIANT_WORDS = {"eager", "cuda", "graph", "compiled", "fused", "sync8"}


def parse_variants(text):
    """'cuda_graph_sync8,compiled_fused_sync8' -> [(name, what it turns on)], checked for order."""
    out = []
    for name in text.split(","):
        words = name.split("_")
        if not set(words) <= VARIANT_WORDS:
            raise SystemExit(f"--variants: {name!r} has words outside {sorted(VARIANT_WORDS)}")
        v = dict(graph=words[0] != "eager", compiled="compiled" in words, fused="fused" in words,
                 sync_every=8 if "sync8" in words else 1)
        for key in ("compiled", "fused"):  # these change the model for good: all variants after one have them too
            if not v[key] and any(w[key] for _, w in out):
                raise SystemExit(f"--variants: {name} follows a {key} variant, and {key} cannot be undone on the "
                                 f"same model: put the variants without {key} first")
        out.append((name, v))
    return out


def prompts(P, n_text, lengths, image_id, vocab, seed=0):
    """One image after 5 template tokens, then text; `lengths` = text tokens per prompt (one prompt each)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        t = torch.randint(1000, vocab - 1000, (5 + n,), generator=g).tolist()
        out.append(t[:5] + [image_id] * P + t[5:])
    return out


class Clock:
    """Host times at which tokens arrive (the callbacks run after the token reached the host)."""

    def __init__(self):
        self.t0, self.times = time.perf_counter(), []

    def __call__(self, *_):
        self.times.append(time.perf_counter())

    def ttft(self):
        return self.times[0] - self.t0

    def decode_rate(self):
        return (len(self.times) - 1) / (self.times[-1] - self.times[0])


# ---- ours --------------------------------------------------------------------------------------------------------


def profile_decode(args, net, step_fn, prompt_len, label, n=16, rows=25):
    """Time n decode steps back to back on the cache the last generate call left (its graph, if any, is reused),
    then run them again under torch.profiler and print the kernels that took the most GPU time, per step (on the
    CPU, --tiny: the ops' own CPU time). Sampling is not in it: only the step_fn, as generate calls it."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    llm, dev = net.llm, args.device
    token = torch.zeros(1, dtype=torch.long, device=dev)
    pos = torch.full((1,), prompt_len, dtype=torch.long, device=dev)
    key_valid = torch.zeros(1, M.cache_size(llm), dtype=torch.bool, device=dev)
    key_valid[:, :prompt_len + 1] = True
    step = step_fn or M.decode_step
    with torch.no_grad():
        step(llm, token, pos, pos, key_valid)  # the slot after the prompt; shapes as in generate, so no new capture
        t = C.now(dev)
        for _ in range(n):
            step(llm, token, pos, pos, key_valid)
        ms = (C.now(dev) - t) / n * 1e3
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as p:
            for _ in range(n):
                step(llm, token, pos, pos, key_valid)
            C.sync(dev)
    if dev == "cuda":
        found = [(e.key, e.count, e.device_time_total) for e in p.key_averages() if e.device_type == DeviceType.CUDA]
    else:
        found = [(e.key, e.count, e.self_cpu_time_total) for e in p.key_averages()]
    found.sort(key=lambda r: -r[2])
    total = sum(us for _, _, us in found) or 1
    what = "kernels" if dev == "cuda" else "CPU ops"
    print(f"\n==== decode profile: {label}: {ms:.3f} ms per step unprofiled ({n} steps back to back); {what} "
          f"{total / n / 1e3:.3f} ms per step in {sum(c for _, c, _ in found) / n:.0f} calls ====")
    print(f"{'us/step':>9} {'share':>6} {'calls/step':>10}  {what[:-1]}")
    for key, count, us in found[:rows]:
        print(f"{us / n:9.1f} {us / total:6.1%} {count / n:10.1f}  {key[:110]}")
    sys.stdout.flush()


def run_ours(args, P, vcfg, lcfg):
    variants = parse_variants(args.variants)
    names = [name for name, _ in variants]
    profiled = set(names) if args.profile == "all" else set(filter(None, args.profile.split(",")))
    if profiled - set(names):
        raise SystemExit(f"--profile {args.profile}: {sorted(profiled - set(names))} not in --variants")
    # the 32 blocks share the graphs compiled for Block.forward, and a variant that changes the blocks (fused) and
    # each eval shape add some: past dynamo's default limit of 8, a new one would silently run eager
    torch._dynamo.config.recompile_limit = 64
    net = C.build_ours(args.tiny, args.device).eval()
    chat = prompts(P, 35, [35], -200, lcfg.vocab_size)
    px = C.pixels(1, vcfg.image_size, args.device)
    cache_len = len(chat[0]) + args.new_tokens

    def gen(batch, pixel_values, n, step_fn=None, sync_every=1):
        clock = Clock()
        M.generate(net, batch, pixel_values, max_new_tokens=n, on_token=lambda i, t: i == 0 and clock(),
                   step_fn=step_fn, max_cache_len=cache_len if len(batch) == 1 else None, sync_every=sync_every)
        return clock

    graphs = args.device == "cuda"  # CUDA graphs need a GPU; on the CPU (--tiny) every variant steps eagerly
    compiled = False
    for name, v in variants:
        if v["fused"] and not net.llm.fused:
            fuse_projections(net.llm)  # compiled blocks recompile for the new layers (dynamo guards on them)
        if v["compiled"] and not compiled:
            compile_for_decoding(net.llm)  # as chat.py compiles its blocks
            for layer in net.vision.layers:  # the CLIP layers, compiled like the decoder blocks
                layer.compile()
            compiled = True
        step_fn = GraphedDecodeStep() if v["graph"] and graphs else None  # captured anew on the model as it is now
        sync_every = v["sync_every"]
        t = time.perf_counter()
        gen(chat, px, 8, step_fn, sync_every)  # warm-up: kernels chosen (compiled), graph captured for this cache
        warm_s = time.perf_counter() - t
        ttft = statistics.median(gen(chat, px, 1, step_fn, sync_every).ttft() for _ in range(5))
        clock = gen(chat, px, args.new_tokens, step_fn, sync_every)
        C.emit(args, bench="chat", variant=name, ttft_ms=round(ttft * 1e3, 2),
               decode_tok_s=round(clock.decode_rate(), 2), new_tokens=len(clock.times), sync_every=sync_every,
               warmup_s=round(warm_s, 1), prompt_positions=len(chat[0]), peak_gb=round(C.peak_gb(args.device), 2),
               versions=C.versions())
        if name in profiled:
            profile_decode(args, net, step_fn, len(chat[0]), f"ours, batch 1, {name}")
    name, v = variants[-1]
    sync_every = v["sync_every"]
    for B in (int(b) for b in args.eval_batches.split(",") if b):
        qs = prompts(P, 0, [60 + (i * 37) % 41 for i in range(B)], -200, lcfg.vocab_size, seed=B)
        pix = C.pixels(B, vcfg.image_size, args.device, seed=B)
        graph_step = GraphedDecodeStep() if v["graph"] and graphs else None  # its own graph for this batch's cache
        gen(qs, pix, args.eval_new_tokens, graph_step, sync_every)  # warm-up
        t = C.now(args.device)
        gen(qs, pix, args.eval_new_tokens, graph_step, sync_every)
        dt = C.now(args.device) - t
        C.emit(args, bench="eval", variant=name, batch=B, new_tokens=args.eval_new_tokens, sync_every=sync_every,
               questions_s=round(B / dt, 2), batch_s=round(dt, 3), peak_gb=round(C.peak_gb(args.device), 2))


# ---- HF ----------------------------------------------------------------------------------------------------------


class Streamer:
    """HF generate's streamer hook: put() gets the prompt first, then each new token (already on the host)."""

    def __init__(self):
        self.clock, self.calls = Clock(), 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:
            self.clock()

    def end(self):
        pass


def run_hf(args, P, vcfg, lcfg):
    net = C.build_hf(args.tiny, args.device).eval()
    net.config.text_config.use_cache = True
    net.generation_config.pad_token_id = 0

    def gen(batch, pixel_values, n, stream=False):
        T = max(len(p) for p in batch)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for i, p in enumerate(batch):  # left padding, as for batched generation
            ids[i, T - len(p):] = torch.tensor(p)
            mask[i, T - len(p):] = 1
        streamer = Streamer() if stream else None
        with torch.no_grad():
            net.generate(input_ids=ids.to(args.device), attention_mask=mask.to(args.device),
                         pixel_values=pixel_values, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         use_cache=True, streamer=streamer)
        return streamer.clock if stream else None

    chat = prompts(P, 35, [35], C.HF_IMAGE_TOKEN, lcfg.vocab_size)
    px = C.pixels(1, vcfg.image_size, args.device)
    gen(chat, px, 8)
    ttft = statistics.median(gen(chat, px, 1, stream=True).ttft() for _ in range(5))
    clock = gen(chat, px, args.new_tokens, stream=True)
    C.emit(args, bench="chat", variant="hf_generate", ttft_ms=round(ttft * 1e3, 2),
           decode_tok_s=round(clock.decode_rate(), 2), new_tokens=len(clock.times), prompt_positions=len(chat[0]),
           peak_gb=round(C.peak_gb(args.device), 2), versions=C.versions())
    for B in (int(b) for b in args.eval_batches.split(",") if b):
        qs = prompts(P, 0, [60 + (i * 37) % 41 for i in range(B)], C.HF_IMAGE_TOKEN, lcfg.vocab_size, seed=B)
        pix = C.pixels(B, vcfg.image_size, args.device, seed=B)
        gen(qs, pix, args.eval_new_tokens)
        t = C.now(args.device)
        gen(qs, pix, args.eval_new_tokens)
        dt = C.now(args.device) - t
        C.emit(args, bench="eval", variant="hf_generate", batch=B, new_tokens=args.eval_new_tokens,
               questions_s=round(B / dt, 2), batch_s=round(dt, 3), peak_gb=round(C.peak_gb(args.device), 2))


def main():
    args = C.parse_args(extra_args)
    if args.tiny:
        args.new_tokens, args.eval_batches = min(args.new_tokens, 16), "2,3"
    torch.manual_seed(0)
    vcfg, lcfg = C.configs(args.tiny)
    (run_ours if args.side == "ours" else run_hf)(args, vcfg.num_patches, vcfg, lcfg)


if __name__ == "__main__":
    main()
