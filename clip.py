"""The CLIP vision tower LLaVA looks through, its HF checkpoint keys, and the image preprocessing in front of it.

LLaVA-1.5 / XTuner's LLaVA-Llama-3 use OpenAI's CLIP ViT-L/14 at 336 px (`openai/clip-vit-large-patch14-336`):

    image (3, 336, 336) -> 14x14 patches -> 576 patch vectors + 1 CLS vector -> 24 pre-norm transformer blocks

and take the output of the *penultimate* block with CLS dropped (`forward`, select_layer=-2): 576 x 1024 per image.

The maths is HF's `CLIPVisionModel` (transformers/models/clip/modeling_clip.py): a bias-free Conv2d patch embedding, a
learned class embedding and position embedding, `pre_layrnorm` (HF's spelling, kept so the keys match), pre-norm
blocks with `quick_gelu` MLPs, and `post_layernorm`, which only the pooled CLS output uses.

Preprocessing is XTuner's (`xtuner/dataset/llava.py`): `Image.open(path).convert("RGB")`, optionally `expand2square`
with the CLIP mean colour, then HF's PIL-based `CLIPImageProcessor` with the openai-336 settings: resize the shortest
edge to 336 (bicubic), center-crop 336x336, scale by 1/255, normalize with the CLIP mean / std.

References: Radford et al. 2021 (CLIP), Liu et al. 2023 (LLaVA-1.5, "Improved Baselines with Visual Instruction
Tuning"), transformers' `image_processing_backends.PilBackend` and `image_transforms` (resize / center_crop maths).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import weights

# ----------------------------------------------------------------------------------------------------------------
# Config


@dataclass
class CLIPConfig:
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")

    @property
    def num_patches(self):
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_name(cls, name):
        if name not in CONFIGS:
            raise KeyError(f"unknown CLIP size {name!r}; known: {', '.join(CONFIGS)}")
        return cls(**CONFIGS[name])

    @classmethod
    def from_hf_config(cls, d):
        """From a `CLIPVisionConfig` dict, or any config holding one under `vision_config` (CLIPConfig, LLaVA).
        Missing fields take HF's CLIPVisionConfig defaults (ViT-B/32), as transformers itself would."""
        d = d.get("vision_config", d)
        act = d.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise ValueError(f"hidden_act {act!r} is not supported: this tower implements OpenAI CLIP's quick_gelu")
        return cls(image_size=_one_side(d.get("image_size", 224), "image_size"),
                   patch_size=_one_side(d.get("patch_size", 32), "patch_size"),
                   hidden_size=d.get("hidden_size", 768), num_layers=d.get("num_hidden_layers", 12),
                   num_heads=d.get("num_attention_heads", 12), intermediate_size=d.get("intermediate_size", 3072),
                   layer_norm_eps=d.get("layer_norm_eps", 1e-5), num_channels=d.get("num_channels", 3))

    def to_hf_config(self):
        """A `CLIPVisionConfig` dict that transformers loads (save_clip adds `architectures` and the dtype)."""
        return {"model_type": "clip_vision_model", "hidden_act": "quick_gelu", "image_size": self.image_size,
                "patch_size": self.patch_size, "hidden_size": self.hidden_size, "num_hidden_layers": self.num_layers,
                "num_attention_heads": self.num_heads, "intermediate_size": self.intermediate_size,
                "layer_norm_eps": self.layer_norm_eps, "num_channels": self.num_channels, "attention_dropout": 0.0}


def _one_side(v, name):
    # HF allows image_size / patch_size as [h, w]; this tower (like every released CLIP) is square
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise ValueError(f"{name} {v} is not square; only square CLIP towers are supported")
        v = v[0]
    return int(v)


CONFIGS = {
    "clip-vit-l-14-336": dict(image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                              intermediate_size=4096),
    # 64 px / patch 8 = 64 patches: enough positions for a CPU demo to see, small enough to train in seconds
    "tiny": dict(image_size=64, patch_size=8, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=256),
}

# ----------------------------------------------------------------------------------------------------------------
# Model


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, C // self.num_heads).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, T, D)
        # every patch sees every patch (no mask, not causal); SDPA's default scale is HF's head_dim ** -0.5
        y = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x):
        h = self.fc1(x)
        # quick_gelu: OpenAI trained CLIP with this sigmoid approximation of GELU, so the weights expect it
        return self.fc2(h * torch.sigmoid(1.702 * h))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.hidden_size))
        self.position_embedding = nn.Embedding(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixel_values):  # (N, 3, S, S)
        x = self.patch_embedding(pixel_values)  # (N, C, S/p, S/p): one vector per non-overlapping patch
        x = x.flatten(2).transpose(1, 2)  # (N, P, C), patches in row-major order
        cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (N, 1, C)
        # position i of the sequence always uses row i of the table, so the whole table is added (HF indexes it
        # with an arange buffer; using the weight directly leaves no buffer to rebuild after a meta-device build)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight  # (N, 1 + P, C)


class CLIPVisionTower(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: HF's key spelling
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_layers))
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.activation_checkpointing = False  # recompute each block in backward (a ViT-LoRA finetune sets it)

    def _embed(self, pixel_values):
        S = self.cfg.image_size
        if tuple(pixel_values.shape[-2:]) != (S, S):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])} but this CLIP takes {S}x{S} images "
                             f"(preprocess(img, size={S}))")
        dtype = self.embeddings.patch_embedding.weight.dtype
        return self.pre_layrnorm(self.embeddings(pixel_values.to(dtype)))  # (N, 1 + P, C)

    def _run(self, x, layers):
        for layer in layers:
            if self.activation_checkpointing and self.training:
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x

    def forward(self, pixel_values, select_layer=-2):
        """Patch features (N, P, C) of one layer, CLS dropped. `select_layer` indexes HF's `hidden_states` tuple:
        0 = the embeddings after pre_layrnorm, i = the output of block i, -1 = the last block, -2 (LLaVA's choice) =
        the penultimate one. Later blocks are not run."""
        n = self.cfg.num_layers + 1 + select_layer if select_layer < 0 else select_layer
        if not 0 <= n <= self.cfg.num_layers:
            raise ValueError(f"select_layer {select_layer} is out of range for a {self.cfg.num_layers}-layer CLIP")
        x = self._run(self._embed(pixel_values), self.layers[:n])  # (N, 1 + P, C)
        return x[:, 1:]  # (N, P, C): LLaVA drops CLS and applies no post_layernorm

    def final(self, pixel_values):
        """HF's (last_hidden_state (N, 1 + P, C), pooler_output (N, C)) for parity tests: post_layernorm is applied
        to CLS only, and only here (HF's last_hidden_state is not normalised); LLaVA never calls this."""
        x = self._run(self._embed(pixel_values), self.layers)
        return x, self.post_layernorm(x[:, 0])


# ----------------------------------------------------------------------------------------------------------------
# HF checkpoint keys

_LAYER_PARAMS = [f"{mod}.{p}" for mod in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                           "self_attn.out_proj", "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]

# HF `CLIPVisionModel` keys -> ours, as transformers >= 5 saves them: bare, with no `vision_model.` level inside
HF_KEYS_UNPREFIXED = {
    **{k: k for k in ("embeddings.patch_embedding.weight", "embeddings.class_embedding",
                      "embeddings.position_embedding.weight", "pre_layrnorm.weight", "pre_layrnorm.bias",
                      "post_layernorm.weight", "post_layernorm.bias")},
    "embeddings.position_ids": None,  # an arange buffer older transformers saved; nothing to load
    **{f"encoder.layers.{{}}.{p}": f"layers.{{}}.{p}" for p in _LAYER_PARAMS},
}

# The rest of a full `CLIPModel` checkpoint (the openai repos): text tower, both projections, temperature; all unused
_TEXT_KEYS = ["text_model.embeddings.token_embedding.weight", "text_model.embeddings.position_embedding.weight",
              "text_model.embeddings.position_ids", "text_model.final_layer_norm.weight",
              "text_model.final_layer_norm.bias", "text_projection.weight", "visual_projection.weight", "logit_scale",
              *(f"text_model.encoder.layers.{{}}.{p}" for p in _LAYER_PARAMS)]

# The hub spelling (`openai/clip-vit-large-patch14-336`, transformers 4.x, XTuner's adapters): `vision_model.*`.
# Other layouts prefix it (HF LLaVA `vision_tower.`, official LLaVA `model.vision_tower.vision_tower.`).
HF_KEYS = {**{"vision_model." + k: v for k, v in HF_KEYS_UNPREFIXED.items()}, **dict.fromkeys(_TEXT_KEYS)}


def table_for(keys):
    """The key table that fits a CLIP checkpoint's keys: the `vision_model.*` one unless no key uses it."""
    return HF_KEYS if any(k.startswith("vision_model.") for k in keys) else HF_KEYS_UNPREFIXED


def load_clip(path, dtype=torch.float32, device="cpu"):
    """Build the tower on the meta device (no memory, no init) and load an HF CLIP checkpoint into it.
    `path`: an HF folder (config.json + model.safetensors or shards + index) of a CLIPVisionModel or a full
    CLIPModel, or one .safetensors file with config.json beside it."""
    path = Path(path)
    config = (path if path.is_dir() else path.parent) / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"no config.json for the CLIP checkpoint {path} (expected {config})")
    cfg = CLIPConfig.from_hf_config(weights.read_json(config))
    with torch.device("meta"):
        model = CLIPVisionTower(cfg)
    reader = weights.CheckpointReader(path)
    weights.load_with_table(model, reader, table_for(reader.keys()), dtype=dtype, device=device)
    return model.eval()


def save_clip(model, folder, dtype=None):
    """Write `model` as an HF `CLIPVisionModel` folder (config.json + `vision_model.*` safetensors) that
    transformers' `CLIPVisionModel.from_pretrained` and our `load_clip` both load."""
    to_hf = weights.invert_table(HF_KEYS)
    state = {}
    for name, t in model.state_dict().items():
        try:
            key = weights.map_key(name, to_hf)
        except KeyError:
            raise ValueError(f"save_clip: {name!r} has no HF CLIPVisionModel key; merge LoRA adapters into the "
                             "tower first (lora.merge_lora) or save them as an adapter") from None
        state[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    dtype = dtype or model.embeddings.patch_embedding.weight.dtype
    hf = {"architectures": ["CLIPVisionModel"], **model.cfg.to_hf_config(),
          "torch_dtype": str(dtype).removeprefix("torch.")}
    files = weights.save_safetensors(state, folder)
    weights.write_json(Path(folder) / "config.json", hf)
    return files


# ----------------------------------------------------------------------------------------------------------------
# Image preprocessing

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's dataset statistics, in [0, 1] RGB
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MEAN_RGB = tuple(int(m * 255) for m in CLIP_MEAN)  # (122, 116, 104): XTuner truncates with int(), not round()
# Limits that only degenerate images reach (see preprocess); below them the result is XTuner's / HF's exactly.
MAX_PAD_SIDE = 8192  # pad mode: a longer side is shrunk to this first (the square canvas would hold side**2 pixels)
MAX_ASPECT = 64  # crop mode: a longer strip is cut to this ratio first (the resize would hold 336 * 336*ratio pixels)


class ImageError(ValueError):
    """An image that cannot be read or has no pixels (the message names the file)."""


def load_image(src):
    """Open a path or binary file as an 8-bit RGB PIL image, as XTuner does: `Image.open(src).convert("RGB")`.
    So alpha is dropped, not composited, other modes get PIL's own conversion, and no EXIF rotation is applied.
    One deliberate difference: 16-bit greyscale ('I;16*', and 'I', as PIL holds 16-bit PNG / TIFF) is scaled to
    8 bits (v / 257, rounded, clipped to 0..65535 first) where PIL's convert would clip every value above 255 to
    white. 'F' (float) images keep PIL's meaning: values in 0..255, clipped."""
    name = src if isinstance(src, (str, Path)) else getattr(src, "name", "<image bytes>")
    try:
        with Image.open(src) as img:
            return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types for broken files (OSError, SyntaxError, DecompressionBombError)
        raise ImageError(f"cannot read image {name}: {type(e).__name__}: {e}") from e


def to_rgb(img):
    """Any PIL mode -> 8-bit RGB (the rules are load_image's)."""
    if img.width == 0 or img.height == 0:
        name = getattr(img, "filename", "") or "<in memory>"
        raise ImageError(f"image {name} has no pixels ({img.width}x{img.height})")
    if img.mode.startswith("I;16") or img.mode == "I":
        a = np.asarray(img).astype(np.float64)  # numpy reads big- and little-endian 16-bit alike
        img = Image.fromarray(np.rint(np.clip(a, 0, 65535) / 257).astype(np.uint8))  # 65535 / 257 = 255 exactly
    try:
        return img.convert("RGB")
    except ValueError as e:  # a few internal modes ('La') have no conversion
        raise ImageError(f"cannot convert a {img.mode!r} image to RGB: {e}") from e


def expand2square(img, color=MEAN_RGB):
    """Pad to a square of side max(w, h) with `color`, the image centred on the long axis (XTuner's / LLaVA's
    'pad' mode; the offset on the short axis is floor((long - short) / 2))."""
    w, h = img.size
    if w == h:
        return img
    canvas = Image.new(img.mode, (max(w, h), max(w, h)), color)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def preprocess(img, size=336, pad_to_square=True):
    """PIL image -> normalised float32 tensor (3, size, size), equal to XTuner's pipeline.
    pad_to_square=True (finetune, chat, eval): expand2square with MEAN_RGB, then resize to size x size.
    pad_to_square=False (pretrain): resize the short side to `size`, center-crop the long side.
    A 1x1 image works as any other; an empty one raises ImageError. Past MAX_PAD_SIDE an image is first shrunk
    (aspect kept, short side at least 1 px); past MAX_ASPECT it is first cut to its central MAX_ASPECT : 1 part (the
    kept square lies well inside it; the sampling grid moves by under a pixel)."""
    img = img if img.mode == "RGB" else to_rgb(img)
    w, h = img.size
    if w == 0 or h == 0:
        raise ImageError(f"image has no pixels ({w}x{h})")
    if pad_to_square:
        if max(w, h) > MAX_PAD_SIDE:
            r = MAX_PAD_SIDE / max(w, h)
            img = img.resize((max(1, round(w * r)), max(1, round(h * r))), Image.Resampling.BICUBIC)
        img = expand2square(img, MEAN_RGB)
    elif max(w, h) > MAX_ASPECT * min(w, h):
        keep = MAX_ASPECT * min(w, h)
        img = img.crop(((w - keep) // 2, 0, (w - keep) // 2 + keep, h) if w > h else
                       (0, (h - keep) // 2, w, (h - keep) // 2 + keep))
    # resize the short side to `size` (bicubic); HF truncates the long side, not rounds (get_resize_output_image_size)
    w, h = img.size
    long_side = int(size * max(w, h) / min(w, h))
    a = np.asarray(img.resize((size, long_side) if w <= h else (long_side, size), Image.Resampling.BICUBIC))
    top, left = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2  # HF's center crop: floor of the margins
    a = a[top:top + size, left:left + size]  # (S, S, 3) uint8
    # HF's exact arithmetic: rescale in float64, cast to float32, then normalise in float32
    x = (a.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))  # (3, S, S)
