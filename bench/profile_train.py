"""Profile train.py's own optimizer steps: run train.py as usual, with torch.profiler around steps 4-6.

    python bench/profile_train.py @recipes/qlora-finetune-gpu1.args --lora ...    (train.py's arguments)
    python bench/profile_train.py ... --synthetic N                 (bench/train_synthetic.py's: random weights)

Prints the wall time per step, the GPU's busy time per step (kernels and copies), and the top operators by GPU time
and by CPU self time, so a slow step is seen to be GPU-bound (busy ~ wall) or host-bound (GPU idle in between).
"""

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402
import train_synthetic  # noqa: E402  (bench/, the folder of this script)

FIRST, N = 4, 3  # profile steps FIRST .. FIRST + N - 1 (the first ones pay warm-up and allocator growth)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main(argv):
    real_step, calls = train.train_step, {"n": 0, "prof": None, "t": 0.0}

    def step(engine, micro_batches, device):
        calls["n"] += 1
        if calls["n"] == FIRST:
            sync()
            calls["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            calls["prof"].__enter__()
            calls["t"] = time.perf_counter()
        out = real_step(engine, micro_batches, device)
        if calls["n"] == FIRST + N - 1:
            sync()
            wall = (time.perf_counter() - calls["t"]) / N
            prof = calls["prof"]
            prof.__exit__(None, None, None)
            events = prof.key_averages()
            # the kernels' own rows only: an operator's row repeats the time of the kernels it launched
            gpu = sum(e.self_device_time_total for e in events
                      if e.device_type == DeviceType.CUDA and not e.is_user_annotation) / N / 1e6
            print(f"\n==== profile of steps {FIRST}-{FIRST + N - 1}: {wall:.3f} s wall per step, GPU busy "
                  f"{gpu:.3f} s per step ({100 * gpu / wall:.0f}%) ====")
            print(events.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70))
            print(events.table(sort_by="self_cpu_time_total", row_limit=20, max_name_column_width=70))
        return out

    train.train_step = step
    (train_synthetic.main if "--synthetic" in argv else train.main)(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
