"""The process group of a training run: start or join it, this process's rank, the few collectives train.py
uses, and the merge of a user's DeepSpeed JSON over train.py's config. Every helper also works without a group (one
process: rank 0 of 1), so tests and tools can call them alone.

`deepspeed` and `torchrun` start one process per GPU and set RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT; a plain `python train.py` sets them itself for a group of one.
"""

import os
import socket

import torch


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
