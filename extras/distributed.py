"""The process group of a training run: start or join it, this process's rank, the few collectives train.py
uses, and the DeepSpeed config of train.py's flags (deepspeed_config, a user's JSON merged over it). Every helper
also works without a group (one process: rank 0 of 1), so tests and tools can call them alone.

`deepspeed` and `torchrun` start one process per GPU and set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; a plain `python train.py` sets them itself for a group of one.
"""

import argparse
import os
import socket
from pathlib import Path

import torch

from weights import read_json

# XTuner's `--deepspeed` names (xtuner/configs/deepspeed/*.json; zero0 is ours) -> (ZeRO stage, optimizer in CPU)
DEEPSPEED_PRESETS = {"deepspeed_zero0": (0, False), "deepspeed_zero1": (1, False), "deepspeed_zero2": (2, False),
                     "deepspeed_zero2_offload": (2, True), "deepspeed_zero3": (3, False),
                     "deepspeed_zero3_offload": (3, True)}


def deepspeed_choice(text):
    """argparse type of --deepspeed: a preset's name, or a DeepSpeed .json file that is there."""
    if text in DEEPSPEED_PRESETS or (text.endswith(".json") and Path(text).is_file()):
        return text
    why = "no such file" if text.endswith(".json") else "no such preset"
    raise argparse.ArgumentTypeError(f"{text}: {why}; give one of {', '.join(DEEPSPEED_PRESETS)} or a DeepSpeed .json")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Start (or join) the process group and return this process's device. Without a launcher the process is rank 0
    of 1: the variables are set here, because without them DeepSpeed would look for MPI to discover its peers."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = deepspeed.get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(accel.device_name())


def leave_group():
    """End a finished run's group of several processes, every rank together. Left to the interpreter's exit, gloo's
    worker threads can outlive it and abort a rank (SIGABRT) after the run has succeeded; NCCL warns about it. A group
    of one is kept: a caller in the same process may still use the engine, and there is no peer to wait for."""
    if world() > 1:
        barrier()
        torch.distributed.destroy_process_group()


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier():
    if world() > 1:
        torch.distributed.barrier()


def broadcast(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t):
    if world() > 1:
        torch.distributed.all_reduce(t)
    return t


def gather_union(items):
    """The union of every rank's set."""
    if world() == 1:
        return set(items)
    every = [None] * world()
    torch.distributed.all_gather_object(every, set(items))
    return set().union(*every)


def log(*a):
    """print on rank 0 only."""
    if rank() == 0:
        print(*a, flush=True)


def merge_config(ours, theirs):
    """The user's DeepSpeed JSON overrides ours key by key (nested dicts merged); "auto" keeps our value."""
    out = dict(ours)
    for k, v in theirs.items():
        if v == "auto":
            continue
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(args, trainable=None, world_size=None):
    """DeepSpeed's config for --deepspeed: a preset, or deepspeed_zero2's with the entries of a JSON file over it.
    `trainable`: the number of trainable parameters, if known; `world_size`: the number of processes, if known."""
    stage, offload = DEEPSPEED_PRESETS.get(args.deepspeed, DEEPSPEED_PRESETS["deepspeed_zero2"])
    alone = world_size == 1
    zero = {"stage": stage}
    if stage > 0:
        zero["overlap_comm"] = not alone  # overlaps the gradients' all-reduce with backward: none on one GPU
    if stage in (1, 2) and trainable:
        # ZeRO-1/2 allocate their gradient buckets at full size (two with overlap_comm), 5e8 elements by default:
        # 2 GB in bf16 for a run that trains 20M (projector) or 189M (LoRA) parameters: no bucket need be larger.
        # On one GPU a bucket is only a staging copy with nothing to communicate, so a small one does (20 MB in bf16)
        zero["reduce_bucket_size"] = min(10_000_000 if alone else 500_000_000, trainable)
    if stage in (1, 2) and alone:
        # ZeRO's contiguous gradient buffer is a second copy of every gradient, allocated whole at each micro-batch's
        # backward beside the sums of the earlier micro-batches; with nothing to communicate, autograd's own will do
        zero["contiguous_gradients"] = False
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.accumulation,
        "gradient_clipping": args.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": args.dtype == "bf16"},  # bf16 weights; ZeRO keeps fp32 master copies
        # fp16: dynamic loss scaling from 2^16 (DeepSpeed's defaults, spelled out). An overflowing step is skipped;
        # every overflow but the first since the scale last grew (hysteresis 2) halves it; 1000 clean steps double it
        "fp16": {"enabled": args.dtype == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_allow_untested_optimizer": True,      # we pass torch's AdamW object
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,                 # we print our own progress line
        "wall_clock_breakdown": False,
    }
    if args.deepspeed.endswith(".json"):
        try:
            theirs = read_json(args.deepspeed)
        except ValueError as e:  # json's JSONDecodeError is one
            raise SystemExit(f"--deepspeed {args.deepspeed}: not valid JSON ({e})") from None
        cfg = merge_config(cfg, theirs)
    if cfg["fp16"].get("enabled") is True and cfg["zero_optimization"].get("stage", 0) == 0:
        raise SystemExit(f"--dtype fp16 with ZeRO-0 ({args.deepspeed}): DeepSpeed 0.19 scales the fp16 loss only under "
                         f"ZeRO 1-3 (ZeRO-0 unscales gradients it never scaled); use --deepspeed deepspeed_zero2")
    return cfg
