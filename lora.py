"""LoRA and QLoRA: a drop-in replacement for nn.Linear with a trainable low-rank update, and PEFT adapter files.

    y = x W^T + b  +  (alpha / r) * B(A(dropout(x)))        W (out, in) frozen, A (r, in), B (out, r) trainable

`LoRALinear` keeps nn.Linear's parameter names `weight` / `bias`, so a base checkpoint loads into a LoRA model
unchanged, and adds `lora_A` / `lora_B` (the names PEFT and XTuner use). QLoRA is a flag on the same class:
`nf4=True` stores the frozen W as 4-bit NormalFloat with double quantization (bitsandbytes), computes the base
product in `compute_dtype`, and leaves the adapter maths unchanged. Adapters are saved in PEFT's layout
(`adapter_config.json` + `adapter_model.safetensors`), which `peft.PeftModel.from_pretrained` and XTuner load.

Loading an 8B model into NF4 without holding it whole in bf16 on the GPU:

    llm = load_llama(path, dtype=torch.bfloat16, device="cpu")   # bf16 in CPU memory (16 GB for 8B), read lazily
    quantize_nf4(llm, LLAMA_TARGETS, device="cuda")             # one matrix at a time: GPU holds NF4 + one bf16 matrix
    llm.to("cuda")                                              # the rest (embeddings, norms, lm_head) stays bf16
    inject_lora(llm, LLAMA_TARGETS, r=64, alpha=16, dropout=0.05)   # adds adapters to the NF4 layers, freezes the rest

References: LoRA (Hu et al. 2021, arXiv:2106.09685), QLoRA (Dettmers et al. 2023, arXiv:2305.14314),
torchtune `modules/peft/lora.py` (the style model), PEFT `tuners/lora/layer.py` (init and file format).
"""

import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file

from weights import CheckpointError, read_json, save_safetensors, write_json

NF4_BLOCKSIZE = 64  # QLoRA's block of weights sharing one absmax; the absmaxes are themselves quantized (double quant)


def _nf4(w, device=None):
    """Quantize a float (out, in) matrix to a bitsandbytes Params4bit (packed uint8 + its QuantState)."""
    import bitsandbytes as bnb  # imported only when NF4 is used: the import alone takes seconds

    device = torch.device(device) if device is not None else w.device
    p = bnb.nn.Params4bit(w.detach().to(device), requires_grad=False, blocksize=NF4_BLOCKSIZE,
                          compress_statistics=True, quant_type="nf4")
    # bitsandbytes quantizes when the parameter moves to a device (not when it is built); doing it here, eagerly,
    # makes the layer usable at once on CPU as on CUDA, and a later module.to(device) only moves the packed bytes
    return p.to(device)


class LoRALinear(nn.Module):
    """nn.Linear with a frozen (optionally NF4) base and a rank-r adapter; r=0 means no adapter."""

    def __init__(self, in_features, out_features, bias=False, r=0, alpha=16, dropout=0.0, nf4=False,
                 compute_dtype=None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = _nf4(base.weight) if nf4 else nn.Parameter(base.weight.data, requires_grad=False)  # (out, in)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.data, requires_grad=False)
        self.nf4 = nf4
        self.init_adapter(r, alpha, dropout)

    @classmethod
    def from_linear(cls, linear, r=0, alpha=16, dropout=0.0, nf4=False, compute_dtype=None, device=None):
        """Wrap an existing nn.Linear (its tensors are reused, not copied). `device`: where the layer lives (default:
        the linear's); NF4 quantization runs there, so device="cuda" quantizes on the GPU one matrix at a time."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, compute_dtype=compute_dtype,
                    device="meta")
        device = device if device is not None else linear.weight.device
        layer.weight = _nf4(linear.weight, device) if nf4 else nn.Parameter(linear.weight.data.to(device), False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
        layer.nf4 = nf4
        layer.init_adapter(r, alpha, dropout)
        return layer

    def float_dtype(self):
        """The dtype the base weight has in floating point (NF4 remembers the dtype it was quantized from)."""
        return self.weight.quant_state.dtype if self.nf4 else self.weight.dtype

    def init_adapter(self, r, alpha=16, dropout=0.0):
        """(Re)create the adapter: A kaiming-uniform as PEFT, B zeros, so the layer starts equal to its base."""
        self.r, self.alpha, self.dropout_p = r, alpha, dropout
        # alpha / r keeps the update's size roughly independent of r, so one lr works across ranks (LoRA paper 4.1)
        self.scaling = alpha / r if r > 0 else 0.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if r == 0:
            self.lora_A = self.lora_B = None
            return
        kw = dict(bias=False, device=self.weight.device, dtype=self.float_dtype())
        self.lora_A = nn.Linear(self.in_features, r, **kw)
        self.lora_B = nn.Linear(r, self.out_features, **kw)
        if self.weight.device.type != "meta":
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):  # (..., in) -> (..., out)
        if self.nf4:
            import bitsandbytes as bnb

            dtype = self.compute_dtype or x.dtype
            bias = None if self.bias is None else self.bias.to(dtype)
            out = bnb.matmul_4bit(x.to(dtype), self.weight, quant_state=self.weight.quant_state, bias=bias).to(x.dtype)
        else:
            out = F.linear(x, self.weight, self.bias)
        if self.r == 0:
            return out
        # the adapters may be kept in another dtype than the activations (fp32 adapters on a bf16 base): cast in and out
        h = self.dropout(x).to(self.lora_A.weight.dtype)  # dropout on the adapter input only, as PEFT
        return out + (self.lora_B(self.lora_A(h)) * self.scaling).to(out.dtype)

    def dequantized_weight(self):  # (out, in) in float_dtype()
        if not self.nf4:
            return self.weight.detach()
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight.data, self.weight.quant_state)

    def merged_weight(self):
        """W + (alpha/r) B @ A, computed in fp32 (a bf16 sum would round the small update away), cast back."""
        w = self.dequantized_weight().float()
        if self.r > 0:
            w = w + self.scaling * (self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float())
        return w.to(self.float_dtype())

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, nf4={self.nf4}"


# ----------------------------------------------------------------------------------------------------------------
# Module surgery


def _swap(module, targets, make):
    """Replace every nn.Linear (or LoRALinear) whose last name component is in `targets` by make(child)."""
    names = []
    for name, child in list(module.named_modules()):
        if name.rpartition(".")[2] in targets and isinstance(child, (nn.Linear, LoRALinear)):
            parent, _, attr = name.rpartition(".")
            setattr(module.get_submodule(parent), attr, make(child))
            names.append(name)
    unused = set(targets) - {n.rpartition(".")[2] for n in names}
    if unused:
        raise ValueError(f"no linear layer named {sorted(unused)} in {type(module).__name__}; check the LoRA targets")
    return names


def inject_lora(module, targets, r, alpha, dropout, nf4=False, compute_dtype=None, device=None):
    """Give every linear named in `targets` (e.g. ["q_proj", "v_proj"]) a rank-r adapter, optionally on an NF4 base;
    layers already quantized by quantize_nf4 just get their adapter. Freezes the rest of `module`; returns the names."""
    def make(child):
        if isinstance(child, LoRALinear):
            child.init_adapter(r, alpha, dropout)
            return child
        return LoRALinear.from_linear(child, r, alpha, dropout, nf4, compute_dtype, device)

    names = _swap(module, targets, make)
    for name, p in module.named_parameters():  # only lora_A / lora_B train (PEFT freezes its model the same way)
        p.requires_grad_(bool({"lora_A", "lora_B"} & set(name.split("."))))
    return names


def quantize_nf4(module, targets, compute_dtype=None, device=None):
    """Store the linears named in `targets` in NF4 (frozen, no adapter), one at a time on `device`."""
    def make(child):
        if isinstance(child, LoRALinear):
            return child
        return LoRALinear.from_linear(child, nf4=True, compute_dtype=compute_dtype, device=device)

    return _swap(module, targets, make)


def _lora_layers(module):
    return [(n, m) for n, m in module.named_modules() if isinstance(m, LoRALinear)]


def merge_lora(module):
    """Replace every LoRALinear by a plain nn.Linear holding its merged, dequantized weight (for export/inference)."""
    for name, m in _lora_layers(module):
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        linear.weight = nn.Parameter(m.merged_weight(), requires_grad=False)
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach().clone(), requires_grad=False)
        parent, _, attr = name.rpartition(".")
        setattr(module.get_submodule(parent), attr, linear)
    return module


# ----------------------------------------------------------------------------------------------------------------
# PEFT adapter files


def save_adapter(module, folder, to_hf_name, r, alpha, dropout, targets, task_type=None, base_model=None):
    """Write `folder/adapter_config.json` + `folder/adapter_model.safetensors` as PEFT's save_pretrained does."""
    layers = [(n, m) for n, m in _lora_layers(module) if m.r > 0]
    wrong = [f"{n} (r={m.r}, alpha={m.alpha})" for n, m in layers if (m.r, m.alpha) != (r, alpha)]
    if not layers or wrong:
        raise ValueError(f"save_adapter(r={r}, alpha={alpha}): the module's LoRA layers are absent or differ: {wrong}")
    # PEFT's file names drop the adapter name ("default"); the paths are the HF model's, under "base_model.model."
    tensors = {f"base_model.model.{to_hf_name(n)}.{ab}.weight": getattr(m, ab).weight.detach()
               for n, m in layers for ab in ("lora_A", "lora_B")}
    write_adapter(folder, tensors, r, alpha, dropout, targets, task_type, base_model)


def write_adapter(folder, tensors, r, alpha, dropout, targets, task_type=None, base_model=None):
    """A PEFT adapter folder from its tensors (PEFT's key names) and settings."""
    save_safetensors(tensors, folder, basename="adapter_model")
    write_json(Path(folder) / "adapter_config.json", {
        "peft_type": "LORA", "task_type": task_type, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(targets), "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {},
        "layers_to_transform": None, "layers_pattern": None, "lora_bias": False})


PEFT_KEY = re.compile(r"^base_model\.model\.(.+)\.(lora_[AB])(?:\.default)?\.weight$")  # XTuner .pth keeps ".default"


def read_adapter(src, config):
    if isinstance(src, dict):
        return src, config
    folder = Path(src)
    config = config if config is not None else read_json(folder / "adapter_config.json")
    if (folder / "adapter_model.safetensors").exists():
        return load_file(folder / "adapter_model.safetensors"), config
    if (folder / "adapter_model.bin").exists():  # XTuner's default; weights_only never runs code from the file
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True), config
    raise FileNotFoundError(f"no adapter_model.safetensors or adapter_model.bin in {folder}")


def load_adapter(module, src, to_hf_name, prefix="", skip=(), config=None):
    """Load a PEFT adapter into the LoRALinear layers of `module`, strictly: a key for a module with no LoRA layer
    here (unless its name or last name component is in `skip`, e.g. XTuner's InternLM2 head "output") and a LoRA
    layer the file does not cover are both errors. src: a PEFT folder, or a state dict (an XTuner .pth, whose part
    prefix="llm." or "visual_encoder." picks). config: {"r", "lora_alpha", ...}, read from the folder when absent.
    Where the file's r / alpha differ from a layer's, its adapter is re-created to match (its dropout kept)."""
    where = "<state dict>" if isinstance(src, dict) else str(src)
    tensors, config = read_adapter(src, config)
    config = config or {}
    unsupported = {k: config[k] for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern", "alpha_pattern")
                   if config.get(k)}
    if unsupported:
        raise CheckpointError(f"adapter {where} uses PEFT options this loader does not implement: {unsupported}")
    layers = dict(_lora_layers(module))
    by_hf = {to_hf_name(n): n for n in layers}
    got, unexpected = {}, []
    for key, t in tensors.items():
        if not key.startswith(prefix):
            continue
        m = PEFT_KEY.match(key[len(prefix):])
        if m and m.group(1) in by_hf:
            got[by_hf[m.group(1)], m.group(2)] = t
        elif not (m and (m.group(1) in skip or m.group(1).rpartition(".")[2] in skip)):
            unexpected.append(key)
    adapted = {n for n, _ in got} | {n for n, lyr in layers.items() if lyr.r > 0}
    missing = [f"{n}.{ab}" for n in sorted(adapted) for ab in ("lora_A", "lora_B") if (n, ab) not in got]
    problems, todo = [], []
    for n in sorted(adapted - {n.rpartition(".")[0] for n in missing}):
        lyr, a, b = layers[n], got[n, "lora_A"], got[n, "lora_B"]
        r, alpha = a.shape[0], config.get("lora_alpha")
        if config.get("r", r) != r or (alpha is None and r != lyr.r):
            problems.append(f"{n}: file r={r}, config r={config.get('r')}, module r={lyr.r} (for a state dict, "
                            f"pass config={{'r': ..., 'lora_alpha': ...}})")
        elif tuple(a.shape) != (r, lyr.in_features) or tuple(b.shape) != (lyr.out_features, r):
            problems.append(f"{n}: lora_A {list(a.shape)}, lora_B {list(b.shape)} do not fit {lyr.extra_repr()}")
        else:
            todo.append((lyr, r, lyr.alpha if alpha is None else alpha, a, b))
    if unexpected or missing or problems:
        lines = [f"adapter {where} does not fit {type(module).__name__}:"]
        if unexpected:
            lines.append(f"  keys for modules with no LoRA layer here ({len(unexpected)}; inject_lora with matching "
                         f"targets, or list them in skip=): " + ", ".join(unexpected[:20]))
        if missing:
            lines.append(f"  LoRA layers the adapter does not cover ({len(missing)}): " + ", ".join(missing[:20]))
        lines += [f"  {p}" for p in problems[:20]]
        raise CheckpointError("\n".join(lines))
    for lyr, r, alpha, a, b in todo:  # nothing is changed until everything has been checked
        if (r, alpha) != (lyr.r, lyr.alpha):
            lyr.init_adapter(r, alpha, lyr.dropout_p)
        with torch.no_grad():
            lyr.lora_A.weight.copy_(a)
            lyr.lora_B.weight.copy_(b)
    return sorted(adapted)
