"""chat.py with one setting changed, to compare it with chat.py's own in the same call:

    python bench/chat_variant.py VARIANT [chat.py's flags]     (bench/chat_cli.py ours DIR --variant VARIANT)

    before   the decoder blocks compiled with inductor's defaults: chat.py's setting before
             extras.fast_inference.compile_for_decoding (cuBLAS for every batch-1 product)
    sdpa     compile_for_decoding's tuned products, but a decode step's attention left to SDPA (the compiled
             graph's cuDNN kernel) instead of the split-KV kernels of extras/decode_attention.py
    wide     compile_for_decoding with a wider coordinate-descent search of the products' tiles (every direction,
             radius 2): a longer first compilation, for tiles the default search may miss
    sync8    chat.py's compilation, with the new tokens brought to the host every 8 decode steps instead of 4
    gcfreeze chat.py, with everything alive after each answer moved out of the garbage collector's reach
             (gc.freeze), so that no collection walks the compiler's objects during a later answer

Everything else is chat.py itself (chat.main): loading, fusing, the CUDA graph, sampling, --stats.
"""

import gc
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import chat  # noqa: E402
import model  # noqa: E402
from extras.fast_inference import DECODE_OPTIONS, use_split_kv_attention  # noqa: E402

WIDE = {**DECODE_OPTIONS, "coordinate_descent_check_all_directions": True, "coordinate_descent_search_radius": 2}
VARIANTS = {  # what each variant replaces in chat.py
    "before": {"compile_for_decoding": lambda llm: llm.compile_blocks()},
    "sdpa": {"compile_for_decoding": lambda llm: llm.compile_blocks(options=DECODE_OPTIONS)},
    "wide": {"compile_for_decoding": lambda llm: use_split_kv_attention(llm).compile_blocks(options=WIDE)},
    "sync8": {"generate": lambda *args, **kw: model.generate(*args, **{**kw, "sync_every": 8})},
    "gcfreeze": {"generate": lambda *args, **kw: (model.generate(*args, **kw), gc.freeze())[0]},
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in VARIANTS:
        sys.exit(f"usage: chat_variant.py {{{','.join(VARIANTS)}}} [chat.py flags]")
    for name, value in VARIANTS[sys.argv[1]].items():
        setattr(chat, name, value)
    sys.exit(chat.main(sys.argv[2:]))
