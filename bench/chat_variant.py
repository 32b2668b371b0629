"""chat.py with one setting changed, to compare it with chat.py's own in the same call:

    python bench/chat_variant.py VARIANT[+VARIANT...] [chat.py's flags]   (bench/chat_cli.py ours DIR --variant V)

    before   the decoder blocks compiled with inductor's defaults: chat.py's setting before
             extras.fast_inference.compile_for_decoding (cuBLAS for every batch-1 product)
    sdpa     compile_for_decoding's tuned products, but a decode step's attention left to SDPA (the compiled
             graph's cuDNN kernel) instead of the split-KV kernels of extras/decode_attention.py
    wide     compile_for_decoding with a wider coordinate-descent search of the products' tiles (every direction,
             radius 2): a longer first compilation, for tiles the default search may miss
    sync8    chat.py's compilation, with the new tokens brought to the host every 8 decode steps instead of 4
    gcfreeze chat.py, with everything alive after each answer moved out of the garbage collector's reach
             (gc.freeze), so that no collection walks the compiler's objects during a later answer
    readfirst chat.py, with each sync's tokens read before the next step is queued (model.to_host brings them at
             once), as generate did before: the GPU waits while Python streams the tokens
    exact    chat.py with a KV cache of exactly the slots an answer needs instead of chat.py's power of two from
             1,024 (as bench/chat_bench.py sizes it): each decode step's attention reads fewer empty slots
    probe    chat.py, timed from inside: for each answer, the host times at which its tokens arrived (in bursts,
             one per sync), the garbage collections during it and their pauses, and for the fourth answer a
             CUDA profile (kernel time against wall time, the idle gaps between kernels, the host's busiest ops).
             The report goes to the file named by $CHAT_PROBE (stderr if unset).

Variants joined by "+" apply together (sync8+gcfreeze). Everything else is chat.py itself (chat.main): loading,
fusing, the CUDA graph, sampling, --stats.
"""

import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import model  # noqa: E402
from extras.fast_inference import DECODE_OPTIONS, use_split_kv_attention  # noqa: E402

WIDE = {**DECODE_OPTIONS, "coordinate_descent_check_all_directions": True, "coordinate_descent_search_radius": 2}


def wrap_generate(make):
    """Replace chat.generate by make(previous chat.generate): variants that wrap it compose."""
    chat.generate = make(chat.generate)


def report(line):
    path = os.environ.get("CHAT_PROBE")
    with (open(path, "a") if path else open(os.dup(2), "w")) as f:
        print(line, file=f)


def probed(generate):
    """generate, reporting for each answer its token bursts and garbage collections (the fourth answer profiled)."""
    answers = [0]
    pauses = []  # (generation, seconds) of each collection while an answer runs
    started = {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        elif "t" in started:
            pauses.append((info["generation"], time.perf_counter() - started.pop("t")))

    def run(*args, **kw):
        answers[0] += 1
        n = answers[0]
        arrivals = []
        user = kw["on_token"]
        kw["on_token"] = lambda row, t: (arrivals.append(time.perf_counter()), user(row, t))
        pauses.clear()
        gc.callbacks.append(on_gc)
        prof = None
        if n == 4 and chat.torch.cuda.is_available():
            from torch.profiler import ProfilerActivity, profile
            prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            prof.__enter__()
        t0 = time.perf_counter()
        try:
            out = generate(*args, **kw)
        finally:
            t1 = time.perf_counter()
            gc.callbacks.remove(on_gc)
            if prof is not None:
                prof.__exit__(None, None, None)
        bursts = [arrivals[0]] + [b for a, b in zip(arrivals, arrivals[1:]) if b - a > 2e-4]
        gaps = [(b - a) * 1e3 for a, b in zip(bursts, bursts[1:])]
        per_gen = {g: (sum(1 for x, _ in pauses if x == g), sum(s for x, s in pauses if x == g) * 1e3)
                   for g in (0, 1, 2)}
        report(f"answer {n}: {len(arrivals)} tokens, {(t1 - arrivals[0]) * 1e3:.1f} ms after the first, "
               f"{len(bursts)} bursts, gap median {statistics.median(gaps) if gaps else 0:.2f} ms, max "
               f"{max(gaps, default=0):.2f} ms; gc "
               + ", ".join(f"gen{g} {c}x {ms:.2f} ms" for g, (c, ms) in per_gen.items()))
        if prof is not None:
            report(profile_summary(prof, t0, t1))
        return out
    return run


def profile_summary(prof, t0, t1):
    """GPU kernel time against the answer's wall time, the idle gaps between kernels, and the host's costliest ops."""
    from torch.autograd import DeviceType

    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    busy, gaps, end = 0.0, [], None
    for s, e in kernels:
        if end is not None and s > end:
            gaps.append(s - end)
        busy += max(0.0, e - max(s, end or s))
        end = e if end is None else max(end, e)
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0.0
    big = sorted(gaps, reverse=True)
    host, gpu = {}, {}
    for e in events:
        side = gpu if e.device_type == DeviceType.CUDA else host
        t = e.self_cpu_time_total if side is host else e.time_range.end - e.time_range.start
        side[e.name] = side.get(e.name, 0.0) + t
    top = sorted(host.items(), key=lambda kv: -kv[1])[:10]
    kernels_top = sorted(gpu.items(), key=lambda kv: -kv[1])[:12]
    return "\n".join([
        f"  profile: wall {(t1 - t0) * 1e3:.1f} ms, kernels span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms "
        f"({len(kernels)} kernels), idle gaps: {sum(gaps) / 1e3:.2f} ms in {len(gaps)}; > 20 us: "
        f"{sum(g for g in gaps if g > 20) / 1e3:.2f} ms in {sum(1 for g in gaps if g > 20)}; largest (us) "
        + " ".join(f"{g:.0f}" for g in big[:12]),
        "  host self time (ms): " + ", ".join(f"{k[:60]} {v / 1e3:.1f}" for k, v in top),
        "  kernels (ms in the answer): " + ", ".join(f"{k[:70]} {v / 1e3:.1f}" for k, v in kernels_top)])


VARIANTS = {  # how each variant changes chat.py
    "before": lambda: setattr(chat, "compile_for_decoding", lambda llm: llm.compile_blocks()),
    "sdpa": lambda: setattr(chat, "compile_for_decoding", lambda llm: llm.compile_blocks(options=DECODE_OPTIONS)),
    "wide": lambda: setattr(chat, "compile_for_decoding",
                            lambda llm: use_split_kv_attention(llm).compile_blocks(options=WIDE)),
    "sync8": lambda: wrap_generate(lambda g: lambda *a, **kw: g(*a, **{**kw, "sync_every": 8})),
    "gcfreeze": lambda: wrap_generate(lambda g: lambda *a, **kw: (g(*a, **kw), gc.freeze())[0]),
    "readfirst": lambda: setattr(model, "to_host", lambda tokens: (tokens.cpu(), None)),
    "exact": lambda: setattr(chat, "cache_length", lambda need, context: need),
    "probe": lambda: wrap_generate(probed),
}

if __name__ == "__main__":
    names = sys.argv[1].split("+") if len(sys.argv) > 1 else []
    if not names or any(n not in VARIANTS for n in names):
        sys.exit(f"usage: chat_variant.py {{{','.join(VARIANTS)}}}[+...] [chat.py flags]")
    for name in names:
        VARIANTS[name]()
    sys.exit(chat.main(sys.argv[2:]))
