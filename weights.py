"""How HF checkpoints map onto our modules: key tables, lazy safetensors reading, strict loading, sharded writing.

Every model file (clip.py, llama.py, and the checkpoint families in extras/) declares a *key table*: a dict from a
checkpoint key pattern to our parameter name pattern, with `{}` standing for a layer number and `None` for a key we
drop on purpose (a CLIP checkpoint's text tower, a stale rotary buffer). Loading is then one generic function:

    model = Llama(cfg) built on the meta device  ->  load_with_table(model, folder, HF_KEYS, dtype)

which reads each tensor with one positioned read from the safetensors file (a few threads at a time, straight on to
the target device, so an 8B model never exists twice in memory), renames it through the table, casts it, and
assigns it. Anything missing, unexpected or of the wrong shape is an error that names the keys; nothing is ever
loaded with an unchecked `strict=False`. The inverted table (`invert_table`) names the keys of an export.
"""

import functools
import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


class CheckpointError(RuntimeError):
    """A checkpoint does not fit the module it is loaded into (the message names the keys)."""


# ----------------------------------------------------------------------------------------------------------------
# Reading


def safetensors_files(path):
    """The .safetensors files of a checkpoint: one file, a folder with an index, or a folder of shards."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint at {path}")
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(read_json(index[0])["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path} (a .bin / .pth checkpoint must be converted first)")
    return files


# safetensors dtype names -> torch dtypes (the format's own spelling, https://github.com/huggingface/safetensors)
SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors_header(file):
    """(header dict, byte offset of the data): a safetensors file is an 8-byte little-endian header length, that
    many bytes of JSON {key: {dtype, shape, data_offsets: [begin, end]}} (offsets relative to the data), then data."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


class CheckpointReader:
    """A lazy view of a (possibly sharded) safetensors checkpoint: tensors are read only when asked for.

    `get` reads one tensor with plain positioned reads into a fresh buffer, not through a memory map: from a cold
    page cache, a read of the whole tensor lets the kernel fetch it in large requests, where a memory map faults
    it in a page at a time; and several threads may call `get` at once (load_with_table does)."""

    def __init__(self, path):
        self.path = Path(path)
        self._where = {}  # key -> (file, absolute byte offset, bytes, dtype name, shape)
        for f in safetensors_files(path):
            header, data_start = read_safetensors_header(f)
            for k, info in header.items():
                if k == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                self._where[k] = (f, data_start + begin, end - begin, info["dtype"], tuple(info["shape"]))
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is not None and end - begin != math.prod(info["shape"]) * dtype.itemsize:
                    raise CheckpointError(f"{f}: {k} holds {end - begin} bytes, its shape {info['shape']} and dtype "
                                          f"{info['dtype']} need {math.prod(info['shape']) * dtype.itemsize}: the "
                                          "file is damaged; download or convert it again")

    def keys(self):
        return list(self._where)

    def __contains__(self, key):
        return key in self._where

    def shape(self, key):
        return self._where[key][4]

    def location(self, key):
        """(file, byte offset): reading keys in this order walks each file front to back."""
        return str(self._where[key][0]), self._where[key][1]

    def get(self, key, pin_memory=False):
        """The tensor, in a fresh CPU buffer (page-locked with pin_memory=True, for asynchronous GPU copies)."""
        f, offset, nbytes, dtype, shape = self._where[key]
        if dtype not in SAFETENSORS_DTYPES:  # a rarer dtype (fp8 ...): let safetensors itself decode it
            with safe_open(f, framework="pt") as h:
                return h.get_tensor(key)
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin_memory)
        view = memoryview(buf.numpy())
        with open(f, "rb", buffering=0) as h:
            h.seek(offset)
            while view.nbytes:  # readinto may return less than asked (Linux reads at most ~2 GB at once)
                n = h.readinto(view)
                if not n:
                    raise CheckpointError(f"{f} ends inside {key}: the file is truncated; download it again")
                view = view[n:]
        return buf.view(SAFETENSORS_DTYPES[dtype]).view(shape)

    def items(self):
        return ((k, self.get(k)) for k in self._where)


class DictReader:
    """The same interface over an in-memory state dict (for XTuner .pth contents and tests)."""

    def __init__(self, state_dict):
        self.sd = state_dict

    def keys(self):
        return list(self.sd)

    def __contains__(self, key):
        return key in self.sd

    def shape(self, key):
        return tuple(self.sd[key].shape)

    def get(self, key):
        return self.sd[key]

    def items(self):
        return self.sd.items()


def as_reader(src):
    """A reader over `src`: a reader as it is, a state dict, or a checkpoint path."""
    if isinstance(src, (CheckpointReader, DictReader)):
        return src
    if isinstance(src, dict):
        return DictReader(src)
    return CheckpointReader(src)


# ----------------------------------------------------------------------------------------------------------------
# Key tables


@functools.cache
def _regex(pattern):
    # "{}" matches a layer number; everything else is literal
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


def map_key(key, table):
    """Rename one checkpoint key through a table; None if the table drops it; KeyError if no pattern matches."""
    for src, dst in table.items():
        m = _regex(src).match(key)
        if m:
            if dst is None:
                return None
            for n in m.groups():
                dst = dst.replace("{}", n, 1)
            return dst
    raise KeyError(key)


def invert_table(table):
    """our pattern -> checkpoint pattern (dropped keys have no inverse)."""
    return {dst: src for src, dst in table.items() if dst is not None}


def hf_name_mapper(table):
    """(to_hf_name, from_hf_name) for module paths, from a weights.py key table: append ".weight", map, strip."""
    def through(tab):
        def rename(path):
            try:
                key = map_key(path + ".weight", tab)
            except KeyError:
                key = None
            if key is None or not key.endswith(".weight"):
                raise KeyError(f"module {path!r} has no '.weight' entry in the key table")
            return key[: -len(".weight")]
        return rename

    return through(invert_table(table)), through(table)


def rename_state_dict(state_dict, table):
    """Rename every key through `table` (keys the table drops are left out; unknown keys raise)."""
    return {new: v for k, v in state_dict.items() if (new := map_key(k, table)) is not None}


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_with_table(module, src, table, dtype=None, device=None, prefix=""):
    """Load a checkpoint into `module` (which may live on the meta device) through a key table.

    `src`: a path (file or folder) or a state dict. Only checkpoint keys starting with `prefix` are considered,
    and the prefix is stripped before the table is applied. Floating tensors are cast to `dtype` (default: the
    module's own parameter dtype, or the checkpoint's when the module is on meta). Raises CheckpointError naming
    every unexpected, missing and wrong-shaped key.
    """
    reader = as_reader(src)
    expected = module.state_dict(keep_vars=True)
    todo, unexpected, bad_shape = [], [], []  # todo: (checkpoint key, our name), every check passed
    for key in reader.keys():
        if not key.startswith(prefix):
            continue
        try:
            ours = map_key(key[len(prefix):], table)
        except KeyError:
            unexpected.append(key)
            continue
        if ours is None:
            continue
        if ours not in expected:
            unexpected.append(f"{key} (-> {ours})")
            continue
        want = tuple(expected[ours].shape)
        if tuple(reader.shape(key)) != want:
            bad_shape.append(f"{key}: checkpoint {list(reader.shape(key))}, model {list(want)}")
            continue
        todo.append((key, ours))
    loaded = {ours for _, ours in todo}
    missing = [k for k in expected if k not in loaded]
    if unexpected or missing or bad_shape:  # checked before a single tensor is read
        lines = [f"checkpoint {getattr(reader, 'path', '<state dict>')} does not fit {type(module).__name__}:"]
        for name, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", bad_shape)):
            if keys:
                more = " ..." if len(keys) > 20 else ""
                lines.append(f"  {name} keys ({len(keys)}): " + ", ".join(keys[:20]) + more)
        raise CheckpointError("\n".join(lines))

    def fetch(item):
        key, ours = item
        t = reader.get(key)
        if device is not None:
            t = t.to(device)  # to the GPU before the cast: a GPU casts fp32 -> bf16 faster than the CPU
        if t.is_floating_point():
            t = t.to(dtype or (expected[ours].dtype if expected[ours].device.type != "meta" else t.dtype))
        return ours, t

    if isinstance(reader, CheckpointReader):
        # Reading one tensor after another leaves the disk idle while each is copied to the GPU, and the GPU idle
        # while the next is read. A few threads keep several reads in flight (file order: near-sequential), and
        # each thread's copy to the device overlaps the others' reads (both release the GIL). Plain pageable
        # copies: pinned buffers would make the copies asynchronous too, but the disk is the slower side, and
        # PyTorch keeps freed pinned memory cached (gigabytes of locked host memory after an 8B load).
        todo.sort(key=lambda item: reader.location(item[0]))
        with ThreadPoolExecutor(max_workers=8) as pool:
            state = dict(pool.map(fetch, todo))
    else:  # other readers (a state dict, InternLM2's unpacking view) are read in order, on this thread
        state = dict(map(fetch, todo))
    module.load_state_dict(state, assign=True)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Writing


@contextmanager
def atomic_write(path):
    """Write a file under a temporary name next to `path`, renamed over `path` when the block ends without error, so
    that a kill leaves the previous file (or none), never half of a new one. The block writes the Path it is given:

        with atomic_write(folder / "model.safetensors") as tmp:
            save_file(tensors, tmp)
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # left by a writer that was killed (os.symlink, for one, would not overwrite it)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # still there only when the block failed


def save_safetensors(state_dict, folder, max_shard_bytes=5_000_000_000, basename="model"):
    """Write a state dict as `model.safetensors`, or as shards plus `model.safetensors.index.json` when larger than
    `max_shard_bytes`; each file written atomically. Returns the paths of the .safetensors files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, size = [{}], 0
    for k, v in state_dict.items():
        v = v.detach().contiguous().cpu()
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    names = [f"{basename}.safetensors"] if len(shards) == 1 else \
            [f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for shard, name in zip(shards, names):
        with atomic_write(folder / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(v.numel() * v.element_size() for shard in shards for v in shard.values())
        weight_map = {k: name for shard, name in zip(shards, names) for k in shard}
        write_json(folder / f"{basename}.safetensors.index.json", {"metadata": {"total_size": total},
                                                                    "weight_map": weight_map})
    return [folder / name for name in names]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    """`obj` as indented UTF-8 JSON, written atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
