"""eval_mmbench.py with one setting changed, to compare it with eval_mmbench.py's own in the same call:

    python bench/eval_variant.py VARIANT [eval_mmbench.py's flags]

    sdpa   decode steps' attention left to F.scaled_dot_product_attention instead of the split-KV kernels of
           extras/decode_attention.py

Everything else is eval_mmbench.main: loading, fusing, the CUDA graph, batching, scoring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_mmbench  # noqa: E402

VARIANTS = {
    "sdpa": {"use_split_kv_attention": lambda llm: llm},
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: eval_variant.py {{{','.join(VARIANTS)}}} [eval_mmbench.py flags]")
    for name, value in VARIANTS[sys.argv[1]].items():
        setattr(eval_mmbench, name, value)
    eval_mmbench.main(sys.argv[2:])
