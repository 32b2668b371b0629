"""How HF checkpoints map onto our modules: key tables, lazy safetensors reading, strict loading, sharded writing.

Every model file (clip.py, llama.py, model.py, convert.py) declares a *key table*: a dict from a checkpoint key
pattern to our parameter name pattern, with `{}` standing for a layer number and `None` for a key we drop on purpose
(a CLIP checkpoint's text tower, a stale rotary buffer). Loading is then one generic function:

    model = Llama(cfg) built on the meta device  ->  load_with_table(model, folder, HF_KEYS, dtype)

which reads one tensor at a time from memory-mapped safetensors (so an 8B model never exists twice in memory),
renames it through the table, casts it, and assigns it. Anything missing, unexpected or of the wrong shape is an
error that names the keys; nothing is ever loaded with an unchecked `strict=False`.
"""

import json
import os
import re
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


class CheckpointReader:
    """A lazy view of a (possibly sharded) safetensors checkpoint: tensors are read only when asked for."""

    def __init__(self, path):
        self.path = Path(path)
        self._where = {}  # key -> file
        for f in safetensors_files(path):
            with safe_open(f, framework="pt") as h:
                for k in h.keys():
                    self._where[k] = f
        self._handles = {}

    def keys(self):
        return list(self._where)

    def __contains__(self, key):
        return key in self._where

    def _slice(self, key):
        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f].get_slice(key)

    def shape(self, key):
        return tuple(self._slice(key).get_shape())

    def get(self, key):
        f = self._where[key]
        if f not in self._handles:
            self._handles[f] = safe_open(f, framework="pt")
        return self._handles[f].get_tensor(key)

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
    if isinstance(src, (CheckpointReader, DictReader)):
        return src
    if isinstance(src, dict):
        return DictReader(src)
    return CheckpointReader(src)


# ----------------------------------------------------------------------------------------------------------------
# Key tables


def _compile(pattern):
    # "{}" matches a layer number; everything else is literal
    return re.compile("^" + re.escape(pattern).replace(r"\{\}", r"(\d+)") + "$")


_cache = {}


def _compiled(table):
    key = id(table)
    if key not in _cache or _cache[key][0] is not table:
        _cache[key] = (table, [(_compile(src), dst) for src, dst in table.items()])
    return _cache[key][1]


def map_key(key, table):
    """Rename one checkpoint key through a table; None if the table drops it; KeyError if no pattern matches."""
    for regex, dst in _compiled(table):
        m = regex.match(key)
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


def rename_state_dict(state_dict, table):
    """Rename every key through `table` (keys the table drops are left out; unknown keys raise)."""
    out = {}
    for k, v in state_dict.items():
        nk = map_key(k, table)
        if nk is not None:
            out[nk] = v
    return out


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
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    state, unexpected, bad_shape = {}, [], []
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
        if reader.shape(key) != want:
            bad_shape.append(f"{key}: checkpoint {list(reader.shape(key))}, model {list(want)}")
            continue
        t = reader.get(key)
        if t.is_floating_point():
            target = dtype or (expected[ours].dtype if expected[ours].device.type != "meta" else t.dtype)
            t = t.to(dtype=target)
        if device is not None:
            t = t.to(device)
        state[ours] = t
    missing = [k for k in expected if k not in state]
    if unexpected or missing or bad_shape:
        lines = [f"checkpoint {getattr(reader, 'path', '<state dict>')} does not fit {type(module).__name__}:"]
        for name, keys in (("unexpected", unexpected), ("missing", missing), ("wrong shape", bad_shape)):
            if keys:
                lines.append(f"  {name} keys ({len(keys)}): " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else ""))
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(state, assign=True)
    return module


# ----------------------------------------------------------------------------------------------------------------
# Writing


def save_safetensors(state_dict, folder, max_shard_bytes=5_000_000_000, basename="model"):
    """Write a state dict as `model.safetensors`, or as shards plus `model.safetensors.index.json` when larger than
    `max_shard_bytes`. Each file is written to a temporary name and renamed, so a kill never leaves a torn file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    shards, current, size = [], {}, 0
    for k, v in tensors.items():
        n = v.numel() * v.element_size()
        if current and size + n > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = v
        size += n
    shards.append(current)
    if len(shards) == 1:
        _atomic_save(shards[0], folder / f"{basename}.safetensors")
        return [folder / f"{basename}.safetensors"]
    weight_map, files = {}, []
    for i, shard in enumerate(shards):
        name = f"{basename}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _atomic_save(shard, folder / name)
        files.append(folder / name)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    write_json(folder / f"{basename}.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files


def _atomic_save(tensors, path):
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path, obj):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)
