"""Profile train.py's own optimizer steps: run train.py as usual, with torch.profiler around steps 4-6.

    python bench/profile_train.py @recipes/qlora-finetune-gpu1.args --lora ...    (train.py's arguments)
    python bench/profile_train.py ... --synthetic N                 (bench/train_synthetic.py's: random weights)

Prints the wall time per step, the GPU's busy time per step (kernels and copies), and the top operators by GPU time
and by CPU self time, so a slow step is seen to be GPU-bound (busy ~ wall) or host-bound (GPU idle in between).
On a GPU it first prints where the memory of step MEMORY_STEP goes: what was allocated before it (parameters,
DeepSpeed's fp32 master copies, Adam's moments) and the peak of each phase of the step (PhasePeaks).
"""

import sys
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402
import train  # noqa: E402
import train_synthetic  # noqa: E402  (bench/, the folder of this script)

FIRST, N = 4, 3  # profile steps FIRST .. FIRST + N - 1 (the first ones pay warm-up and allocator growth)
MEMORY_STEP = 3  # the step whose memory is measured (after the first optimizer step made Adam's states)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class PhasePeaks:
    """The peak of allocated GPU memory in each phase of the step's micro-batches: forward, the loss's backward (the
    lm_head chunks, up to the hidden states' gradient), the blocks' backward (with DeepSpeed's gradient copies), and
    the optimizer step. (torch's allocation recorder, with stacks, breaks this step's checkpointed cross-entropy.)"""

    def __init__(self, engine):
        self.engine, self.peaks, self.marks = engine, {}, []

    def mark(self, phase):
        self.peaks[phase] = max(self.peaks.get(phase, 0), torch.cuda.max_memory_allocated())
        torch.cuda.reset_peak_memory_stats()
        # where this phase ends in the allocator's event trace (recorded without stacks: see alive_at_peak)
        self.marks.append((phase, len(torch.cuda.memory._snapshot()["device_traces"][0])))

    def alive_at_peak(self, trace):
        """The allocations made during the step that are alive at its highest point, by size: recorded without
        Python stacks (context=None), which keeps the checkpointed cross-entropy working."""
        live, cur, best = {}, 0, (0, 0, {})
        for i, e in enumerate(trace):
            if e["action"] == "alloc":
                live[e["addr"]] = e["size"]
                cur += e["size"]
                if cur > best[0]:
                    best = (cur, i, dict(live))
            elif e["action"] == "free_requested" and e["addr"] in live:
                cur -= live.pop(e["addr"])
        phase = next((p for p, n in self.marks if n > best[1]), "?")
        sizes = {}
        for size in best[2].values():
            sizes[size] = sizes.get(size, 0) + 1
        top = sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:14]
        return (f"  at the step's highest point ({phase} phase) {best[0] / 1e9:.2f} GB more than at its start, in "
                f"{len(best[2])} blocks; the largest kinds, MB x count: "
                + ", ".join(f"{s / 1e6:.1f} x {n}" for s, n in top))

    def __enter__(self):
        e, self.real = self.engine, (model.chunked_cross_entropy, self.engine.backward, self.engine.step)
        real_ce, real_backward, real_step = self.real

        def ce(hidden, *a, **kw):
            if hidden.requires_grad:
                hidden.register_hook(lambda g: self.mark("loss backward"))
            return real_ce(hidden, *a, **kw)

        def backward(*a, **kw):
            self.mark("forward")
            out = real_backward(*a, **kw)
            self.mark("blocks backward")
            return out

        def step(*a, **kw):
            out = real_step(*a, **kw)
            self.mark("optimizer step")
            return out

        model.chunked_cross_entropy, e.backward, e.step = ce, backward, step
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(context=None, max_entries=10 ** 7)
        return self

    def __exit__(self, *exc):
        model.chunked_cross_entropy = self.real[0]
        del self.engine.backward, self.engine.step  # the class's methods again
        self.trace = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))


def resident(engine):
    """What lies in GPU memory between steps, by kind, in GB: parameters, DeepSpeed's fp32 master copies, the
    optimizer's states (Adam's moments)."""
    params = list(engine.module.parameters())
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    gb = {"frozen parameters on the GPU": nbytes(p for p in params if not p.requires_grad and p.is_cuda),
          "trainable parameters": nbytes(p for p in params if p.requires_grad),
          "fp32 master copies": nbytes(getattr(opt, "single_partition_of_fp32_groups", None)
                                       or getattr(opt, "fp32_groups_flat_partition", [])),
          "optimizer states": nbytes(t for st in inner.state.values() for t in st.values())}
    return " | ".join(f"{k} {v / 1e9:.2f}" for k, v in gb.items())


def main(argv):
    real_step, calls = train.train_step, {"n": 0, "prof": None, "t": 0.0}

    def step(engine, micro_batches, device):
        calls["n"] += 1
        if calls["n"] == MEMORY_STEP and torch.cuda.is_available():
            sync()
            before = torch.cuda.memory_allocated()
            with PhasePeaks(engine) as peaks:
                out = real_step(engine, micro_batches, device)
            print(f"\n==== memory of step {MEMORY_STEP}: {before / 1e9:.2f} GB allocated before it; peak in each phase:"
                  f" {' | '.join(f'{k} {v / 1e9:.2f} GB' for k, v in peaks.peaks.items())} ====")
            print(f"  resident before the step, GB: {resident(engine)}")
            print(peaks.alive_at_peak(peaks.trace))
            return out
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
