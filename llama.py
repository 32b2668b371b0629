"""The Llama decoder (Llama-2, Llama-3, Llama-3.1) in plain PyTorch: config, model, static KV cache, HF weights.

    tokens -> embed_tokens -> N x [x + attn(rmsnorm(x)), x + mlp(rmsnorm(x))] -> norm -> (lm_head -> logits)

- RMSNorm (Zhang & Sennrich 2019) computed in fp32, cast back before the weight multiply, exactly as HF does.
- RoPE (Su et al. 2021, arXiv:2104.09864) in HF's *rotate-half* layout: HF checkpoints store q/k rows for it, so the
  weights load unpermuted (Meta's original code rotates interleaved pairs and would need q_proj/k_proj permuted).
  Llama-3.1's "llama3" frequency scaling is supported. SwiGLU MLP (Shazeer 2020, arXiv:2002.05202).
- Grouped-query attention (Ainslie et al. 2023, arXiv:2305.13245) through F.scaled_dot_product_attention, with a
  preallocated static-shape KV cache (the gpt-fast design) so that a decode step can be torch.compile'd.

Module names follow HF's `LlamaForCausalLM` (minus its `model.` prefix) so that LoRA targets and PEFT adapter keys
match. InternLM2 is this decoder under other checkpoint names (q, k, v packed into one `wqkv`): extras/internlm2.py
reads and writes that layout (`cfg.layout`). References: transformers/models/llama/modeling_llama.py and
modeling_rope_utils.py (the numerics we match), pytorch-labs/gpt-fast and meta-llama/llama3 model.py (the structure).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import weights


@dataclass
class LlamaConfig:
    vocab_size: int = 128256
    hidden_size: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 8
    intermediate_size: int = 14336
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: dict | None = None  # None, {"rope_type": "llama3", "factor", ...}, or "linear" / "dynamic" + factor
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    head_dim: int | None = None  # derived: hidden_size // num_heads
    layout: str = "llama"  # the HF checkpoint layout read and written: "llama" or "internlm2" (extras/internlm2.py)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")

    @classmethod
    def from_name(cls, name):
        if name not in CONFIGS:
            raise KeyError(f"unknown Llama size {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf_config(cls, d):
        """Read a raw HF config.json dict: transformers 4.x `rope_theta` + `rope_scaling`, or 5.x `rope_parameters`."""
        need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if any(k not in d for k in need):
            raise ValueError(f"config.json lacks {[k for k in need if k not in d]}; is it a LlamaForCausalLM "
                             "(or InternLM2ForCausalLM) config?")
        unsupported = {k: d[k] for k in ("attention_bias", "mlp_bias", "bias", "hidden_act")  # InternLM2: "bias"
                       if d.get(k) not in (None, False, "silu")}
        if unsupported:
            raise ValueError(f"config.json has {unsupported}: only Llama's bias-free silu layers are supported")
        params = d.get("rope_parameters") or {}  # transformers >= 5 keeps theta and scaling together here
        scaling = dict(d.get("rope_scaling") or {k: v for k, v in params.items() if k != "rope_theta"})
        kind = scaling.pop("rope_type", scaling.pop("type", "default"))  # older configs spell it "type"
        if kind not in ("default", "llama3", "linear", "dynamic"):
            raise ValueError(f"rope_scaling type {kind!r} is not supported (only none, 'llama3', 'linear', 'dynamic')")
        return cls(vocab_size=d["vocab_size"], hidden_size=d["hidden_size"], num_layers=d["num_hidden_layers"],
                   num_heads=d["num_attention_heads"], intermediate_size=d["intermediate_size"],
                   num_kv_heads=d.get("num_key_value_heads") or d["num_attention_heads"], head_dim=d.get("head_dim"),
                   rms_norm_eps=d.get("rms_norm_eps", 1e-6), tie_word_embeddings=d.get("tie_word_embeddings", False),
                   rope_theta=float(params.get("rope_theta", d.get("rope_theta", 10000.0))),
                   rope_scaling=None if kind == "default" else {"rope_type": kind, **scaling},
                   max_position_embeddings=d.get("max_position_embeddings", 2048),
                   layout="internlm2" if d.get("model_type") == "internlm2" else "llama")

    def to_hf_config(self):
        """A config.json dict for transformers' LlamaConfig (the 4.x spelling, which 5.x also reads)."""
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "head_dim": self.head_dim, "intermediate_size": self.intermediate_size,
                "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta, "rope_scaling": self.rope_scaling,
                "max_position_embeddings": self.max_position_embeddings, "attention_bias": False, "mlp_bias": False,
                "tie_word_embeddings": self.tie_word_embeddings}


CONFIGS = {
    "llama-3-8b": dict(),  # the dataclass defaults are Llama-3-8B(-Instruct)
    "llama-3.1-8b": dict(max_position_embeddings=131072, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b": dict(vocab_size=32000, num_kv_heads=32, intermediate_size=11008, rope_theta=10000.0,
                       max_position_embeddings=4096),
    # CPU demo size with the real Llama-3 vocabulary, so the real tokenizer drives it
    "tiny": dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128),
}


# ----------------------------------------------------------------------------------------------------------------
# Building blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the mean of squares over 4096 channels needs fp32 (bf16 keeps 8 mantissa bits); HF casts back to the input
        # dtype *before* multiplying by the weight, and so do we, so that bf16 outputs match HF's bit for bit
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(cfg, device=None):
    """The D/2 RoPE inverse frequencies theta^(-2i/D), fp32, with Llama-3.1's "llama3" scaling when configured."""
    D = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2, device=device).float() / D))  # (D/2,)
    kind = (cfg.rope_scaling or {}).get("rope_type", "default")
    if kind == "linear":  # positions divided by `factor` (HF and InternLM2 "linear"), i.e. frequencies divided
        return inv_freq / cfg.rope_scaling["factor"]
    if kind in ("default", "dynamic"):
        # "dynamic" NTK scaling (InternLM2's configs) raises theta only once a sequence is longer than
        # max_position_embeddings (32k for InternLM2), which setup_cache refuses; below that it is plain RoPE
        return inv_freq
    # Llama-3.1: wavelengths shorter than original_len / high_freq_factor are kept, those longer than
    # original_len / low_freq_factor are stretched by `factor`, and the band between is interpolated smoothly
    s = cfg.rope_scaling
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    lo, hi = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    in_band = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
    return torch.where(in_band, smoothed, scaled)


def apply_rope(x, cos, sin):
    # "rotate half": channel i is rotated together with channel i + D/2 (Meta's interleaved layout pairs i, i+1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, H, T, D)


def attention_mask(q_slots, key_valid, S):
    """(B|1, 1, T, S) bool: query t sees key slot s iff s <= q_slots[t] and the slot holds a real token."""
    slots = torch.arange(S, device=q_slots.device)
    mask = slots[None, :] <= q_slots[:, None]  # (T, S) causal by slot
    if key_valid is not None:
        mask = mask[None] & key_valid[:, None, :]  # (B, T, S) left padding masked out
        # a padding query would otherwise see no key at all, and SDPA kernels disagree on such a row (NaN in older
        # versions, zeros, or an unmasked average); seeing itself keeps it well defined (its output is never used)
        mask = mask | (slots[None, :] == q_slots[:, None])
    return mask.view(-1, 1, len(q_slots), S)


class KVCache(nn.Module):
    """Preallocated keys and values of one layer; a step writes its T slots in place, so every shape is static."""

    def __init__(self, batch, max_len, n_kv_heads, head_dim, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        # zeros, not empty: a masked slot still enters the math kernel's softmax(..) @ V as 0 * v, and 0 * NaN = NaN
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, cache_pos, k, v):
        self.k.index_copy_(2, cache_pos, k.to(self.k.dtype))  # (B, Hkv, S, D)
        self.v.index_copy_(2, cache_pos, v.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    sdpa = staticmethod(F.scaled_dot_product_attention)  # extras/fast_inference.py may give a decode step its own

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        C, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(C, cfg.num_heads * D, bias=False)
        self.k_proj = nn.Linear(C, cfg.num_kv_heads * D, bias=False)
        self.v_proj = nn.Linear(C, cfg.num_kv_heads * D, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * D, C, bias=False)
        self.qkv_proj = None     # q_proj, k_proj, v_proj stacked into one (extras/fast_inference.py)
        self.cache = None        # a KVCache after Llama.setup_cache

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        B, T, _ = x.shape
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        if self.qkv_proj is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:  # one GEMM (in decode, one GEMV reading one larger matrix) instead of three, cut at the q | k | v rows
            q, k, v = self.qkv_proj(x).split([H * D, Hkv * D, Hkv * D], dim=-1)
        q = q.view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k, v = (t.view(B, T, Hkv, D).transpose(1, 2) for t in (k, v))  # (B, Hkv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_pos is not None:
            k, v = self.cache.update(cache_pos, k, v)  # (B, Hkv, S, D): the whole cache, masked below
        # GQA: each group of H / Hkv query heads shares one K/V head, broadcast inside the kernel (BENCHMARKS.md)
        y = self.sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=Hkv != H)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_proj = None  # gate_proj and up_proj stacked into one (extras/fast_inference.py)

    def forward(self, x):
        if self.gate_up_proj is None:
            gate, up = self.gate_proj(x), self.up_proj(x)
        else:  # one GEMM instead of two, cut into its [gate | up] halves
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask=None, cache_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


# ----------------------------------------------------------------------------------------------------------------
# The model


class Llama(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        for m in self.modules():  # HF's initializer_range; only random (demo) models keep these values
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.activation_checkpointing = False  # or True (every block), or an int k: the first k blocks
        self.fused = False  # True after extras.fast_inference.fuse_projections: neither saved nor trained
        self.init_rope()

    def compile_blocks(self, **compile_kwargs):
        """torch.compile each block in place (one compilation serves all); outputs match eager to bf16 rounding."""
        for layer in self.layers:
            layer.compile(**compile_kwargs)
        return self

    def embed(self, input_ids):
        """Token embeddings (B, T, C) on input_ids' device. The frozen table may live in CPU memory while the blocks
        are on the GPU (train.py --cpu-embeddings): the lookup then runs on the CPU and only its rows travel."""
        table = self.embed_tokens.weight
        return self.embed_tokens(input_ids.to(table.device)).to(input_ids.device)

    def train(self, mode=True):
        if mode and self.fused:
            raise RuntimeError("this Llama's projections were fused for inference (fuse_projections): it cannot "
                               "train; load the model again to train it")
        return super().train(mode)

    def init_rope(self, device=None):
        """(Re)compute the RoPE frequencies after a meta-device build; non-persistent: derived, never saved."""
        self.register_buffer("inv_freq", rope_frequencies(self.cfg, device), persistent=False)

    def rope(self, positions, dtype):
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:
            # a blanket model.to(bf16) (DeepSpeed's bf16 mode does one) rounds the frequencies, which moves the
            # angles by radians at long positions; recompute them in fp32 instead
            inv_freq = rope_frequencies(self.cfg, inv_freq.device)
        freqs = positions[..., None].float() * inv_freq  # (B, T, D/2), fp32 angles as HF computes them
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D) rotate-half layout
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # (B, 1, T, D), broadcast over heads

    def forward(self, input_ids=None, inputs_embeds=None, positions=None, cache_pos=None, key_valid=None,
                segment_ids=None):
        """Hidden states after the final norm, (B, T, C); logits are `self.lm_head(h)`.
        Training: only input_ids or inputs_embeds; positions default to 0..T-1 and attention is causal.
        Cache mode (after setup_cache): cache_pos (T,) long = the cache slots this step writes (the same for every
        row), positions (B, T) = RoPE positions (default: cache_pos), key_valid (B, max_len) bool = slots holding
        real tokens (False for left padding). Without a cache, key_valid (B, T) masks left padding too.
        Packed samples (extras/packing.py): segment_ids (B, T) numbers the samples of each row; a token attends only
        to earlier tokens of its own sample, and positions (B, T) restart at 0 for each sample."""
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        T = h.shape[1]
        if cache_pos is None:
            q_slots, S = torch.arange(T, device=h.device), T
        else:
            if self.layers[0].self_attn.cache is None:
                raise RuntimeError("cache_pos given but no KV cache: call model.setup_cache(batch, max_len) first")
            q_slots, S = cache_pos, self.layers[0].self_attn.cache.k.shape[2]
        cos, sin = self.rope(q_slots[None] if positions is None else positions, h.dtype)  # (B|1, 1, T, D)
        # without cache or padding, SDPA's is_causal=True picks the fastest kernel; otherwise an explicit bool mask
        mask = None if (cache_pos is None and key_valid is None) else attention_mask(q_slots, key_valid, S)
        if segment_ids is not None:  # block-diagonal causal mask: each packed sample is its own sequence
            same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
            mask = (attention_mask(q_slots, key_valid, S) if mask is None else mask) & same[:, None]
        # a checkpointed block (all if True, else the first k) keeps only its input and recomputes the rest in backward
        ac = self.activation_checkpointing
        n_ckpt = (len(self.layers) if ac is True else int(ac)) if self.training and torch.is_grad_enabled() else 0
        for i, layer in enumerate(self.layers):
            h = checkpoint(layer, h, cos, sin, mask, cache_pos, use_reentrant=False) if i < n_ckpt else \
                layer(h, cos, sin, mask, cache_pos)
        return self.norm(h)

    def setup_cache(self, batch, max_len, dtype=None, device=None):
        if (self.cfg.rope_scaling or {}).get("rope_type") == "dynamic" and max_len > self.cfg.max_position_embeddings:
            raise ValueError(f"a {max_len}-slot cache is past max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}, where 'dynamic' RoPE scaling would start; "
                             "this implementation stops below it: ask for fewer new tokens")
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.norm.weight.device
        for layer in self.layers:
            a = layer.self_attn
            a.cache = KVCache(batch, max_len, a.n_kv_heads, a.head_dim, dtype, device)

    def grow_cache(self, max_len):
        """A longer cache (max_len slots) holding what the current one holds: a conversation that outgrew it goes on
        without recomputing its history. New buffers, so a CUDA graph captured on the old ones must be recaptured."""
        for layer in self.layers:
            old = layer.self_attn.cache
            B, Hkv, S, D = old.k.shape
            new = KVCache(B, max_len, Hkv, D, old.k.dtype, old.k.device)
            new.k[:, :, :S] = old.k
            new.v[:, :, :S] = old.v
            layer.self_attn.cache = new

    def reset_cache(self):
        for layer in self.layers:
            layer.self_attn.cache.k.zero_()
            layer.self_attn.cache.v.zero_()

    def free_cache(self):
        for layer in self.layers:
            layer.self_attn.cache = None


# ----------------------------------------------------------------------------------------------------------------
# HF checkpoints: `LlamaForCausalLM` keys <-> ours ("{}" = layer number, None = dropped on purpose)

HF_KEYS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
    **{f"model.layers.{{}}.{p}.weight": f"layers.{{}}.{p}.weight"
       for p in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                 "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")},
    "model.layers.{}.self_attn.rotary_emb.inv_freq": None,  # a buffer old transformers versions saved; we recompute it
}


def load_llama(path, dtype=torch.bfloat16, device="cpu", table=HF_KEYS, reader=None):
    """Build on the meta device (no memory), then read the safetensors one tensor at a time straight into place.
    table / reader: another checkpoint family of this decoder (extras/internlm2.py) and a reader under its names."""
    path = Path(path)
    cfg = LlamaConfig.from_hf_config(weights.read_json((path if path.is_dir() else path.parent) / "config.json"))
    if cfg.layout != "llama" and table is HF_KEYS:
        raise weights.CheckpointError(f"{path} is a {cfg.layout} checkpoint: load it with extras.loader.load_llm")
    with torch.device("meta"):
        model = Llama(cfg)
    if cfg.tie_word_embeddings:
        # the shared matrix is stored once, as the embedding (a copy under the head's name, if any, is ignored)
        del model.lm_head.weight
        table = {k: (None if v == "lm_head.weight" else v) for k, v in table.items()}
    weights.load_with_table(model, reader(path, cfg) if reader else path, table, dtype=dtype, device=device)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.init_rope(device)
    return model.eval()


def save_llama(model, folder, dtype=torch.bfloat16, max_shard_bytes=5_000_000_000, table=HF_KEYS, pack=None,
               hf_config=None):
    """Write `model` as an HF LlamaForCausalLM folder (config.json + safetensors) that transformers loads.
    table / pack / hf_config: another family of this decoder (extras/internlm2.py), its packing and config.json."""
    if model.fused:
        raise ValueError("save_llama: this model's projections were fused for inference (fuse_projections), "
                         "a layout no checkpoint has; save the model before fusing it, or load it again")
    to_hf = weights.invert_table(table)
    state = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and model.cfg.tie_word_embeddings:
            continue  # the same tensor as the embedding; HF stores it once
        try:
            hf_name = weights.map_key(name, to_hf)
        except KeyError:
            raise KeyError(f"{name} has no HF Llama name; merge LoRA adapters first (lora.merge_lora)") from None
        state[hf_name] = t.to(dtype) if t.is_floating_point() else t
    weights.save_safetensors(pack(state) if pack else state, folder, max_shard_bytes=max_shard_bytes)
    config = hf_config or model.cfg.to_hf_config()
    weights.write_json(Path(folder) / "config.json", {**config, "torch_dtype": str(dtype)[6:]})
