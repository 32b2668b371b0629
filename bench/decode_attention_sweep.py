"""The split-KV decode attention's tile settings, timed as a decode step runs them: 32 layers' calls (each on its own
K/V cache, so that none is served from L2) captured in one CUDA graph and replayed, at the 8B model's head shapes
(32 query heads over 8 K/V heads of 128), batch 1, bf16. F.scaled_dot_product_attention is timed the same way.

    python bench/decode_attention_sweep.py [--slots 1024,2048] [--replays 50]

Prints µs per layer for each (BLOCK_N, MAX_SPLITS, NUM_WARPS) of extras/decode_attention.py, best
first; each setting's output is checked against SDPA's before and after its replays.
"""

import argparse
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from extras import decode_attention as DA  # noqa: E402

LAYERS, H, HKV, D = 32, 32, 8, 128
DA_DEFAULT = (DA.BLOCK_N, DA.MAX_SPLITS, DA.NUM_WARPS)


def graphed_us(fn, qs, ks, vs, keep, replays):
    """µs per layer of fn(q, k, v, keep) over the 32 layers, replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(LAYERS):
            fn(qs[i], ks[i], vs[i], keep)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(LAYERS):
            fn(qs[i], ks[i], vs[i], keep)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / replays / LAYERS


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slots", default="1024,2048")
    p.add_argument("--replays", type=int, default=50)
    p.add_argument("--quick", action="store_true", help="9 settings around the default instead of 32")
    args = p.parse_args()
    dev = torch.device("cuda")
    for S in (int(s) for s in args.slots.split(",")):
        qs = [torch.randn(1, H, 1, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        ks = [torch.randn(1, HKV, S, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn(1, HKV, S, D, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)]
        keep = (torch.arange(S, device=dev) < S * 7 // 8).view(1, 1, 1, S)  # a cache mostly filled
        want = F.scaled_dot_product_attention(qs[0].float(), ks[0].float(), vs[0].float(), attn_mask=keep,
                                              enable_gqa=True)
        results = []
        sdpa = graphed_us(lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True),
                          qs, ks, vs, keep, args.replays)
        grid = ((32, 64, 128), (16, 32, 64), (4,)) if args.quick else ((16, 32, 64, 128), (16, 32, 64, 128), (2, 4))
        for bn, splits, warps in itertools.product(*grid):
            DA.BLOCK_N, DA.MAX_SPLITS, DA.NUM_WARPS = bn, splits, warps
            setting = f"S {S} BLOCK_N {bn} MAX_SPLITS {splits} NUM_WARPS {warps}"
            try:
                err = (DA.split_kv_attention(qs[0], ks[0], vs[0], keep).float() - want).abs().max().item()
                us = graphed_us(DA.split_kv_attention, qs, ks, vs, keep, args.replays)
                err = max(err, (DA.split_kv_attention(qs[0], ks[0], vs[0], keep).float() - want).abs().max().item())
            except Exception as e:  # a tile that does not compile or fit: reported, the sweep goes on
                print(f"{setting}: {type(e).__name__}: {str(e)[:150]}")
                continue
            if err > 2e-2:
                print(f"{setting}: wrong, max error {err:.3g}")
                continue
            results.append((us, bn, splits, warps))
        results.sort()
        print(f"==== {S} slots: SDPA {sdpa:.2f} us/layer; split-KV best first "
              "(us/layer, BLOCK_N, MAX_SPLITS, NUM_WARPS)")
        for us, bn, splits, warps in results[:12]:
            print(f"  {us:6.2f}  {bn:4d} {splits:4d} {warps:2d}")
        default = [r for r in results if r[1:] == DA_DEFAULT]
        print(f"  default tiles {DA_DEFAULT}: {default[0][0]:.2f}" if default else "  default tiles: missing")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
