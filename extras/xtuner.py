"""XTuner's files: its key spellings, its `.pth` checkpoints read without running them, and its projector.

XTuner saves a LLaVA as a folder (`projector/`, `llm_adapter/`, `visual_encoder_adapter/`, a fully trained LLM at
the root, a fully trained tower in `visual_encoder/`) or, while training, as `iter_N.pth`: a pickle holding the
trainable weights only (`projector.model.*`, `llm.base_model.model.*.lora_{A,B}.default.weight` or `llm.model.*`,
the same under `visual_encoder.`), written as a file or as the DeepSpeed folder of that name. haotian-liu/LLaVA's
own `llava_llama` folder (XTuner's `--save-format official`) is here too: its keys are XTuner's projector inside
the Llama checkpoint.

XTuner's `.pth` files are pickles that also hold mmengine objects. They are read with a restricted unpickler that
builds tensors and plain containers only and turns every other class into an inert placeholder: no code from the
file is ever run (torch's `weights_only=True` would refuse the file outright).
"""

import pickle
from pathlib import Path

import torch

import clip
import llama
from weights import CheckpointReader, read_json, rename_state_dict

# XTuner's projector folder: an nn.Sequential, so its Linear layers are `model.0` and `model.2` (`model.1` is GELU)
XTUNER_PROJECTOR_KEYS = {f"model.{j}.{p}": f"linear_{i}.{p}" for i, j in ((1, 0), (2, 2))
                         for p in ("weight", "bias")}

# haotian-liu/LLaVA `LlavaLlamaForCausalLM`: the Llama keys unchanged, then the projector and the tower inside `model.`
OFFICIAL_KEYS = {**{k: (None if v is None else "llm." + v) for k, v in llama.HF_KEYS.items()},
                 **{"model.vision_tower.vision_tower." + k: (None if v is None else "vision." + v)
                    for k, v in clip.HF_KEYS.items()},
                 **{"model.mm_projector." + k[len("model."):]: "projector." + v
                    for k, v in XTUNER_PROJECTOR_KEYS.items()}}


class _Inert:
    """Stands in for any class or function a pickle names that is not a tensor or a plain container: building it,
    calling it or restoring its state only stores the arguments."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Inert(*args)


_ALLOWED = {  # what a state dict of tensors needs, and nothing that can run code
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
} | {("torch", n) for n in ("bfloat16", "float16", "float32", "float64", "int64", "int32", "int8", "uint8", "bool")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return type(f"Inert[{module}.{name}]", (_Inert,), {})


class _RestrictedPickle:
    """A `pickle_module` for torch.load. torch subclasses our Unpickler (its `find_class` still decides), and answers
    storage classes itself, so tensors load; every other global becomes an _Inert placeholder."""
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


def safe_torch_load(path):
    return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickle, weights_only=False)


def read_xtuner_pth(path):
    """The trainable-only state dict of an XTuner checkpoint: `iter_N.pth` as a file ({"meta", "state_dict", ...})
    or as the DeepSpeed folder XTuner writes under that name (`mp_rank_00_model_states.pt` -> "module"). A LLaVA
    run holds `projector.*`; a text-only run (XTuner's LLM SFT) holds `llm.*` only."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("**/mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path} is a folder without mp_rank_00_model_states.pt: not a DeepSpeed "
                                    "checkpoint")
        obj = safe_torch_load(files[0])
        sd = obj.get("module") if isinstance(obj, dict) else None
    else:
        obj = safe_torch_load(path)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(str(k).startswith(("projector.", "llm.")) for k in sd):
        raise ValueError(f"{path}: no `projector.*` or `llm.*` weights found; is this an XTuner checkpoint?")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def is_projector_folder(path):
    return (path / "config.json").exists() and read_json(path / "config.json").get("model_type") == "projector"


def is_xtuner(path):
    """XTuner's export folder, its projector folder alone, or an iter_N.pth (file or DeepSpeed folder)."""
    path = Path(path)
    return ((path / "projector").is_dir() or is_projector_folder(path) or path.suffix == ".pth"
            or (path / "mp_rank_00_model_states.pt").exists())


def read_projector(path, state_dict=None):
    """Projector weights in our names (`linear_1.weight`, ...) from XTuner's export folder or its projector/ folder
    (`model.0.*`, `model.2.*`), or an XTuner iter_N.pth (`projector.model.*`; or its already-read state dict)."""
    path = Path(path)
    if (path / "projector").is_dir():
        path = path / "projector"
    if path.is_dir() and is_projector_folder(path):
        bin_file = path / "pytorch_model.bin"  # XTuner's default (it saves safetensors only when asked)
        sd = safe_torch_load(bin_file) if bin_file.exists() else dict(CheckpointReader(path).items())
        return rename_state_dict(sd, XTUNER_PROJECTOR_KEYS)
    sd = read_xtuner_pth(path) if state_dict is None else state_dict
    return rename_state_dict({k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")},
                             XTUNER_PROJECTOR_KEYS)
