"""Load-time benchmark: an 8B LLaVA's weights (Llama-3-8B + CLIP ViT-L/14-336, bf16 safetensors, HF layouts) read
from disk onto the GPU with a cold page cache.

    python bench/load_bench.py --side ours --phase write --dir /tmp/bench_ckpt   # random weights -> safetensors
    python bench/load_bench.py --side ours --phase load  --dir /tmp/bench_ckpt   # llama.load_llama + clip.load_clip
    python bench/load_bench.py --side hf   --phase load  --dir /tmp/bench_ckpt   # from_pretrained(device_map=...)

Before each timed load the page cache is dropped: `sync`, then `echo 3 > /proc/sys/vm/drop_caches` (root only), and
in any case posix_fadvise(POSIX_FADV_DONTNEED) on every checkpoint file; the record says which of these worked.
The clock starts after CUDA is initialised (the process start and `import torch` are not counted) and stops when
the last tensor is on the GPU. The projector (42 MB) is not included on either side.
"""

import os
import sys
import time
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  importing transformers (HF side) imports it, and so does our first op on the
#                       meta device (~2 s): both sides start the clock with it imported

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402
import clip  # noqa: E402
import llama  # noqa: E402


def extra_args(p):
    p.add_argument("--phase", choices=["write", "load"], required=True)
    p.add_argument("--dir", default="/tmp/bench_ckpt")


def drop_page_cache(folder, system_wide=True):
    """Evict the checkpoint from the page cache; returns how. system_wide=False (--tiny, a shared machine) skips
    drop_caches, which empties every process's cache, and relies on fadvise alone."""
    os.sync()
    how = []
    if system_wide:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            how.append("drop_caches=3")
        except OSError as e:
            how.append(f"drop_caches failed ({e.strerror})")
    n = 0
    for path in Path(folder).rglob("*.safetensors"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    how.append(f"fadvise DONTNEED on {n} files")
    return ", ".join(how)


def write(args):
    folder = Path(args.dir)
    net = C.build_ours(args.tiny, args.device)
    t = time.perf_counter()
    llama.save_llama(net.llm, folder / "llm")
    clip.save_clip(net.vision, folder / "clip", dtype=torch.bfloat16)
    os.sync()
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    C.emit(args, bench="load_write", seconds=round(time.perf_counter() - t, 1), gb=round(size / 1e9, 2))


def load(args):
    folder = Path(args.dir)
    size = sum(p.stat().st_size for p in folder.rglob("*.safetensors"))
    if args.device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA context first: not part of the load
    if args.side == "hf":
        from transformers import CLIPVisionModel, LlamaForCausalLM  # imported before the clock starts
    how = drop_page_cache(folder, system_wide=not args.tiny)
    t = time.perf_counter()
    if args.side == "ours":
        llm = llama.load_llama(folder / "llm", dtype=torch.bfloat16, device=args.device)
        vision = clip.load_clip(folder / "clip", dtype=torch.bfloat16, device=args.device)
    else:
        llm = LlamaForCausalLM.from_pretrained(folder / "llm", dtype=torch.bfloat16, device_map=args.device)
        vision = CLIPVisionModel.from_pretrained(folder / "clip", dtype=torch.bfloat16, device_map=args.device)
    dt = C.now(args.device) - t
    n = sum(p.numel() for m in (llm, vision) for p in m.parameters())
    on = {p.device.type for m in (llm, vision) for p in m.parameters()}
    C.emit(args, bench="load", seconds=round(dt, 2), gb=round(size / 1e9, 2), read_gb_s=round(size / 1e9 / dt, 2),
           params=n, on=sorted(on), cache_drop=how, versions=C.versions())


def main():
    args = C.parse_args(extra_args)
    write(args) if args.phase == "write" else load(args)


if __name__ == "__main__":
    main()
