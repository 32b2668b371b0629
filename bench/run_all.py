"""Run every benchmark, ours and HF, each in its own subprocess with a timeout, inside one time budget; write
JSON lines and print a summary table with the ratios ours / HF.

    python bench/run_all.py --out $OUT --budget 540        # on the GPU (see bench/run_all.sh)
    python bench/run_all.py --tiny --out /tmp/bench        # the same jobs at tiny shapes on the CPU

Jobs run in priority order; one whose timeout no longer fits in the budget is skipped (and listed as skipped), so
an OOM, a hang or a slow job costs only its own result.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (name, script, arguments, timeout s at full size)
JOBS = [
    ("pretrain/ours", "train_bench.py", "--side ours --workload pretrain --profile", 100),
    ("pretrain/hf", "train_bench.py", "--side hf --workload pretrain", 80),
    ("qlora/ours", "train_bench.py", "--side ours --workload qlora --ckpt-layers all --profile", 70),
    ("qlora/hf", "train_bench.py", "--side hf --workload qlora", 80),
    ("lora/ours", "train_bench.py", "--side ours --workload lora --ckpt-layers all", 60),
    ("lora/hf", "train_bench.py", "--side hf --workload lora", 70),
    ("chat/ours", "chat_bench.py", "--side ours --profile", 100),
    ("chat/hf", "chat_bench.py", "--side hf", 100),
    ("load/write", "load_bench.py", "--side ours --phase write", 100),
    ("load/ours", "load_bench.py", "--side ours --phase load", 60),
    ("load/hf", "load_bench.py", "--side hf --phase load", 60),
    ("pretrain_long/ours", "train_bench.py", "--side ours --workload pretrain_long", 80),
    ("pretrain_long/hf", "train_bench.py", "--side hf --workload pretrain_long", 60),
    ("lora_nockpt/ours", "train_bench.py", "--side ours --workload lora --ckpt-layers auto --tag no-recompute", 60),
    ("lora_bf16base/hf", "train_bench.py", "--side hf --workload lora --no-kbit-prep --tag bf16-base", 70),
    ("pretrain_mb16/ours", "train_bench.py", "--side ours --workload pretrain --mb 16 --tag mb16", 70),
    # round 2 (BENCHMARKS.md): compiled blocks, fewer host syncs in decode
    ("pretrain_compiled/ours", "train_bench.py", "--side ours --workload pretrain --compile --profile", 190),
    ("chat2/ours", "chat_bench.py", "--side ours --variants cuda_graph,cuda_graph_sync8,compiled_sync8", 220),
    ("pretrain_long_compiled/ours", "train_bench.py", "--side ours --workload pretrain_long --compile", 150),
    # round 3: decode with fused q/k/v and gate/up GEMVs, and GQA decode attention without SDPA; kernel tables
    ("chat3/ours", "chat_bench.py",
     "--side ours --variants compiled_sync8,compiled_fused_sync8 --profile", 300),
]

GOALS = {  # what BENCHMARKS.md checks; ratio = ours / HF
    "pretrain": "samples/s >= 1.5x HF", "pretrain_long": "tokens/s >= 1.5x HF",
    "qlora": "tokens/s >= 1.3x HF, peak <= 0.7x HF", "lora": "tokens/s >= 1.3x HF, peak <= 0.7x HF",
    "chat": "decode >= 150 tok/s, TTFT <= 40 ms", "eval": ">= 20 questions/s", "load": "<= 15 s",
}


def run_job(name, script, extra, timeout, args, log):
    cmd = [sys.executable, str(HERE / script), *extra.split(), "--out", str(args.results)]
    if name.startswith("load/"):
        cmd += ["--dir", args.ckpt_dir]
    if args.tiny:
        cmd.append("--tiny")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log.write(f"\n######## {name}: {' '.join(cmd)}\n")
    log.flush()
    t = time.time()
    # a session of its own, so a timeout kills the job and anything it started
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        rc = p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = "timeout"
    dt = time.time() - t
    log.write(f"######## {name}: rc={rc} in {dt:.0f} s\n")
    log.flush()
    print(f"{name:22s} rc={rc} {dt:5.0f} s", flush=True)
    return rc


def summarize(results):
    rows = [json.loads(line) for line in Path(results).read_text().splitlines() if line.strip()]
    by = {}
    extra = [r for r in rows if r.get("tag")]
    for r in rows:
        if r.get("tag"):
            continue
        key = r["bench"], r.get("workload") or r.get("batch") or "", r["side"], r.get("variant", "")
        by[key] = r
    out = []

    def ratio(a, b):
        return f"{a / b:.2f}x" if a and b and a == a and b == b else "-"

    nan = float("nan")

    def row(label, ours, hf, r=""):
        out.append(f"{label:40s} {ours:>28s} {hf:>28s} {r:>8s}")

    def speed(r):
        return f"{r['samples_s']:.2f} smp/s {r['tokens_s']:.0f} tok/s" if r else "-"

    def mem(r):
        return f"{r['peak_gb']:.1f} GB mb {r['micro_batch']} ck {r['ckpt_layers']}"[:28] if r else "-"

    row("benchmark", "ours", "HF", "ratio")
    for wl in ("pretrain", "pretrain_long", "qlora", "lora"):
        o = by.get(("train", wl, "ours", "")) or {}
        h = by.get(("train", wl, "hf", "")) or {}
        if not (o or h):
            continue
        row(wl + " speed", speed(o), speed(h), ratio(o.get("tokens_s"), h.get("tokens_s")))
        row(wl + " peak mem", mem(o), mem(h), ratio(o.get("peak_gb"), h.get("peak_gb")))
        if "mfu" in o or "mfu" in h:
            row(wl + " MFU", str(o.get("mfu", "-")), str(h.get("mfu", "-")))
    for r in extra:
        if r["bench"] == "train":
            row(f"{r['workload']} {r['side']} {r['tag']}", speed(r), mem(r))
    hf_chat = by.get(("chat", "", "hf", "hf_generate")) or {}
    for (bench, _, side, variant), r in by.items():
        if bench == "chat" and side == "ours":
            hd, ht = hf_chat.get("decode_tok_s", nan), hf_chat.get("ttft_ms", nan)
            row(f"chat decode ({variant})", f"{r['decode_tok_s']:.1f} tok/s", f"{hd:.1f} tok/s",
                ratio(r["decode_tok_s"], hd))
            row(f"chat TTFT ({variant})", f"{r['ttft_ms']:.1f} ms", f"{ht:.1f} ms", ratio(r["ttft_ms"], ht))
    for (bench, batch, side, variant), r in sorted(by.items(), key=str):
        if bench == "eval" and side == "ours":
            hq = (by.get(("eval", batch, "hf", "hf_generate")) or {}).get("questions_s", nan)
            row(f"eval batch {batch} ({variant})", f"{r['questions_s']:.1f} q/s", f"{hq:.1f} q/s",
                ratio(r["questions_s"], hq))
    o, h = by.get(("load", "", "ours", "")) or {}, by.get(("load", "", "hf", "")) or {}
    if o or h:
        os_, hs = o.get("seconds", nan), h.get("seconds", nan)
        row("load 8B, cold page cache", f"{os_:.1f} s", f"{hs:.1f} s", ratio(os_, hs))
    out.append("goals: " + "; ".join(f"{k}: {v}" for k, v in GOALS.items()))
    return "\n".join(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--budget", type=float, default=540, help="seconds for all jobs together")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--only", default="", help="comma-separated job names (default: all)")
    p.add_argument("--ckpt-dir", default="/tmp/bench_ckpt")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.results = out / "results.jsonl"
    deadline = time.time() + args.budget
    with open(out / "log.txt", "a") as log:
        jobs = JOBS
        if args.only:  # in the order given: the first ones get the budget first
            by_name = {j[0]: j for j in JOBS}
            jobs = [by_name[n] for n in args.only.split(",")]
        for name, script, extra, timeout in jobs:
            if args.tiny:
                timeout = 300
            left = deadline - time.time()
            if left < min(timeout, 45):
                print(f"{name:22s} skipped: {left:.0f} s left in the budget", flush=True)
                continue
            run_job(name, script, extra, min(timeout, left), args, log)
    summary = summarize(args.results) if args.results.exists() else "no results"
    (out / "summary.txt").write_text(summary + "\n")
    print("\n" + summary)


if __name__ == "__main__":
    main()
