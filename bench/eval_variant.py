"""eval_mmbench.py with one setting changed, to compare it with eval_mmbench.py's own in the same call:

    python bench/eval_variant.py VARIANT [eval_mmbench.py's flags]

    split_kv   a decode step's attention on the split-KV kernels of extras/decode_attention.py (as chat.py has it
               on a GPU) instead of F.scaled_dot_product_attention

Everything else is eval_mmbench.main: loading, fusing, the CUDA graph, batching, scoring.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import eval_mmbench  # noqa: E402
from extras.fast_inference import use_split_kv_attention  # noqa: E402

make_generator = eval_mmbench.make_generator


def split_kv_generator(net, *args, **kw):
    use_split_kv_attention(net.llm)
    return make_generator(net, *args, **kw)


VARIANTS = {  # what each variant replaces in eval_mmbench.py
    "split_kv": {"make_generator": split_kv_generator},
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: eval_variant.py {{{','.join(VARIANTS)}}} [eval_mmbench.py flags]")
    for name, value in VARIANTS[sys.argv[1]].items():
        setattr(eval_mmbench, name, value)
    eval_mmbench.main(sys.argv[2:])
