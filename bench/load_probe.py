"""Where the load time goes: read every tensor of the load benchmark's checkpoint (bench/load_bench.py --phase write)
with weights.CheckpointReader from a cold page cache, in one of a few ways, in a fresh process each.

    python bench/load_probe.py --side ours --mode cpu:8        # read only, 8 threads: the disk's own rate
    python bench/load_probe.py --side ours --mode cuda:8       # + a synchronous copy to the GPU (load_with_table)
    python bench/load_probe.py --side ours --mode cuda-pinned:8  # page-locked buffers, non_blocking copies
"""

import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import load_bench  # noqa: E402
import weights  # noqa: E402


def main():
    args = C.parse_args(lambda p: (p.add_argument("--mode", default="cuda:8"),
                                   p.add_argument("--dir", default="/tmp/bench_ckpt")))
    kind, threads = args.mode.split(":")
    folder = Path(args.dir)
    readers = [weights.CheckpointReader(folder / "llm"), weights.CheckpointReader(folder / "clip")]
    if args.device == "cuda":
        torch.zeros(1, device="cuda")
    how = load_bench.drop_page_cache(folder, system_wide=not args.tiny)
    pinned = kind == "cuda-pinned" and args.device == "cuda"
    to_gpu = kind.startswith("cuda") and args.device == "cuda"

    def fetch(rk):
        reader, key = rk
        t = reader.get(key, pin_memory=pinned)
        return t.to("cuda", non_blocking=pinned) if to_gpu else t

    todo = [(r, k) for r in readers for k in sorted(r.keys(), key=r.location)]
    t = time.perf_counter()
    with ThreadPoolExecutor(int(threads)) as pool:
        n = sum(x.numel() * x.element_size() for x in pool.map(fetch, todo))
    dt = C.now(args.device) - t
    C.emit(args, bench="load_probe", mode=args.mode, seconds=round(dt, 2), gb=round(n / 1e9, 2),
           read_gb_s=round(n / 1e9 / dt, 2), cache_drop=how)


if __name__ == "__main__":
    main()
