"""Convert a trained LLaVA between every layout the ecosystem uses.

    python convert.py runs/latest --to hf --out llava-hf                # transformers LlavaForConditionalGeneration
    python convert.py runs/latest --to xtuner --out llava-xtuner        # projector/ + llm_adapter/ + ... (XTuner)
    python convert.py runs/latest --to official --out llava-official    # haotian-liu/LLaVA `llava_llama`
    python convert.py runs/latest --to llm --out llama-merged           # the LLM alone, LoRA merged (HF Llama)
    python convert.py runs/latest --to clip --out clip-merged           # the vision tower alone, LoRA merged
    python convert.py runs/latest --to adapters --out adapters          # PEFT adapters (as trained, not merged)
    python convert.py work_dirs/x/iter_2181.pth --llm META_LLAMA --vision CLIP --to hf --out llava-hf

Sources: our run folder (llava.json), any of the layouts above, XTuner's `iter_N.pth` (a file, or the DeepSpeed
folder XTuner writes under that name) and XTuner's published projector folder. Everything is written as
safetensors (bf16 by default, `--fp32` on request), sharded with an index past `--max-shard-size`. `--verify`
reloads the export and compares its logits with the source model's on a probe image and prompt.

Every layout is a key table: HF's lives in model.py (`hf_llava_keys`), Llama's in llama.py, CLIP's in clip.py;
the XTuner and official ones below. A QLoRA run is dequantized, then merged (XTuner refuses to export it).

XTuner's `.pth` files are pickles that also hold mmengine objects. They are read with a restricted unpickler that
builds tensors and plain containers only and turns every other class into an inert placeholder: no code from the
file is ever run (SPEC §4).
"""

import argparse
import io
import json
import pickle
import shutil
import sys
from pathlib import Path

import torch

import clip
import data
import llama
import lora
from model import (IMAGE_TOKEN_INDEX, LLM_LORA_TARGETS, VISION_LORA_TARGETS, LLaVA, Projector, hf_llava_keys,
                   load_model, save_model)
from tokenizer import load_tokenizer, write_hf_tokenizer
from weights import (CheckpointReader, DictReader, invert_table, load_with_table, read_json, rename_state_dict,
                     save_safetensors, write_json)

DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

# XTuner's projector folder: an nn.Sequential, so its Linear layers are `model.0` and `model.2` (`model.1` is GELU)
XTUNER_PROJECTOR_KEYS = {f"model.{j}.{p}": f"linear_{i}.{p}" for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")}

# haotian-liu/LLaVA `LlavaLlamaForCausalLM`: the Llama keys unchanged, then the projector and the tower inside `model.`
OFFICIAL_KEYS = {**{k: (None if v is None else "llm." + v) for k, v in llama.HF_KEYS.items()},
                 **{"model.vision_tower.vision_tower." + k: (None if v is None else "vision." + v)
                    for k, v in clip.HF_KEYS.items()},
                 **{f"model.mm_projector.{j}.{p}": f"projector.linear_{i}.{p}"
                    for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias")}}

CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's preprocessor_config.json, with our size
    "crop_size": {"height": 336, "width": 336}, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True,
    "do_rescale": True, "do_resize": True, "image_mean": list(clip.CLIP_MEAN), "image_std": list(clip.CLIP_STD),
    "image_processor_type": "CLIPImageProcessor", "resample": 3, "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 336}}


# ----------------------------------------------------------------------------------------------------------------
# Reading XTuner's pickles without running them


class _Inert:
    """Stands in for any class a pickle names that is not a tensor or a plain container."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state

    def __call__(self, *args, **kwargs):
        return _Inert(*args)


_ALLOWED = {
    ("collections", "OrderedDict"), ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch.storage", "UntypedStorage"),
    ("torch", "device"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
} | {("torch", n) for n in ("BFloat16Storage", "HalfStorage", "FloatStorage", "DoubleStorage", "LongStorage",
                             "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage",
                             "bfloat16", "float16", "float32", "float64", "int64", "int32", "int8", "uint8", "bool")}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        return type(f"Inert[{module}.{name}]", (_Inert,), {})


class _RestrictedPickle:
    """A `pickle_module` for torch.load that only rebuilds tensors and containers."""
    Unpickler = _RestrictedUnpickler

    @staticmethod
    def load(f, **kw):
        return _RestrictedUnpickler(f, **kw).load()


def safe_torch_load(path):
    return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickle, weights_only=False)


def read_xtuner_pth(path):
    """The trainable-only state dict of an XTuner checkpoint: `iter_N.pth` as a file ({"state_dict": ...}) or as the
    DeepSpeed folder XTuner writes under that name (`mp_rank_00_model_states.pt` -> "module", bf16)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("**/mp_rank_00_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"{path} is a folder without mp_rank_00_model_states.pt: not a DeepSpeed checkpoint")
        obj = safe_torch_load(files[0])
        sd = obj.get("module") if isinstance(obj, dict) else None
    else:
        obj = safe_torch_load(path)
        sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not any(k.startswith("projector.") for k in sd):
        raise ValueError(f"{path}: no `projector.*` weights found; is this an XTuner LLaVA checkpoint?")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def read_projector(path):
    """Projector weights in our names from: our run folder, XTuner's projector folder, or an XTuner iter_N.pth."""
    path = Path(path)
    if (path / "model" / "llava.json").exists():
        path = path / "model"
    if (path / "projector.safetensors").exists():
        return dict(CheckpointReader(path / "projector.safetensors").items())
    if (path / "projector").is_dir():
        path = path / "projector"
    if path.is_dir() and (path / "config.json").exists() and read_json(path / "config.json").get("model_type") == "projector":
        if list(path.glob("*.safetensors")):
            sd = dict(CheckpointReader(path).items())
        else:
            sd = safe_torch_load(path / "pytorch_model.bin")
        return rename_state_dict(sd, XTUNER_PROJECTOR_KEYS)
    sd = read_xtuner_pth(path)
    return rename_state_dict({k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")},
                             XTUNER_PROJECTOR_KEYS)


# ----------------------------------------------------------------------------------------------------------------
# Reading every layout into our modules


def load_any(path, dtype=torch.bfloat16, device="cpu", llm=None, vision=None, template="llama3_chat",
             lora_alpha=16, vision_lora_alpha=16):
    """Any supported layout -> (LLaVA, tokenizer, cfg). `llm` / `vision` name the base models when the layout only
    holds what was trained (XTuner's layout and .pth, a projector folder)."""
    path = Path(path)
    if path.is_dir() and ((path / "llava.json").exists() or (path / "model" / "llava.json").exists()):
        return load_model(path, dtype, device)
    cfg_json = read_json(path / "config.json") if (path / "config.json").exists() else {}
    if cfg_json.get("model_type") == "llava":
        return load_model(path, dtype, device)
    if cfg_json.get("model_type") == "llava_llama":
        return _load_official(path, cfg_json, dtype, device, template)
    if (path / "projector").is_dir():
        return _load_xtuner_folder(path, dtype, device, llm, vision, template)
    if cfg_json.get("model_type") == "projector" or path.suffix == ".pth" or (path / "mp_rank_00_model_states.pt").exists():
        return _load_xtuner_pth(path, dtype, device, llm, vision, template, lora_alpha, vision_lora_alpha)
    raise ValueError(f"{path}: not a layout convert.py knows (our run folder with llava.json, an HF LLaVA folder, an "
                     "XTuner folder with projector/, an official llava_llama folder, or an XTuner iter_N.pth)")


def _need(value, flag, what):
    if not value:
        raise ValueError(f"{what} does not contain the base {flag[2:]}: pass {flag} PATH (an HF folder)")
    return value


def _base_cfg(llm_path, vision_path, template, select_layer=-2):
    vcfg = clip.CLIPConfig.from_hf_config(read_json(Path(vision_path) / "config.json"))
    tcfg = llama.LlamaConfig.from_hf_config(read_json(Path(llm_path) / "config.json"))
    return {"llm": str(llm_path), "vision": str(vision_path), "template": template, "select_layer": select_layer,
            "image_mode": "pad", "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches,
            "projector": {"in": vcfg.hidden_size, "hidden": tcfg.hidden_size, "out": tcfg.hidden_size},
            "llm_mode": "frozen", "llm_lora": None, "vision_lora": None}


def _new_model(cfg, dtype, device, llm_path=None):
    model = LLaVA(clip.load_clip(cfg["vision"], dtype=dtype, device=device),
                  Projector(cfg["projector"]["in"], cfg["projector"]["out"], cfg["projector"]["hidden"]),
                  llama.load_llama(llm_path or cfg["llm"], dtype=dtype, device=device), cfg["select_layer"])
    return model.to(device=device, dtype=dtype)


def _load_xtuner_folder(path, dtype, device, llm, vision, template):
    full_llm = (path / "config.json").exists()  # XTuner puts a fully trained LLM at the root of its folder
    llm_path = path if full_llm else _need(llm, "--llm", path)
    cfg = _base_cfg(llm_path, _need(vision, "--vision", path), template)
    cfg["llm_mode"] = "full" if full_llm else "frozen"
    model = _new_model(cfg, dtype, device)
    load_with_table(model.projector, read_projector(path), {k: k for k in _projector_names()}, dtype)
    for sub, part, table, key in (("llm_adapter", model.llm, llama.HF_KEYS, "llm_lora"),
                                  ("visual_encoder_adapter", model.vision, clip.HF_KEYS, "vision_lora")):
        if (path / sub).is_dir():
            c = read_json(path / sub / "adapter_config.json")
            lora.inject_lora(part, c["target_modules"], c["r"], c["lora_alpha"], 0.0)
            lora.load_adapter(part, path / sub, lora.hf_name_mapper(table)[0])
            cfg[key] = {"r": c["r"], "alpha": c["lora_alpha"], "dropout": c.get("lora_dropout", 0.0),
                        "targets": list(c["target_modules"])}
    if cfg["llm_lora"]:
        cfg["llm_mode"] = "lora"
    return model.eval(), load_tokenizer(llm_path), cfg


def _projector_names():
    return [f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")]


def _load_xtuner_pth(path, dtype, device, llm, vision, template, lora_alpha, vision_lora_alpha):
    """XTuner iter_N.pth: trainable-only keys (`projector.model.*`, `llm.*` when full, `llm.base_model.model.*lora_*`
    and `visual_encoder.base_model.model.*lora_*` for adapters). LoRA alpha is not in the file: XTuner's Llama-3
    recipes use 16 (--lora-alpha / --vision-lora-alpha otherwise)."""
    sd = read_xtuner_pth(path) if not Path(path, "config.json").exists() else {}
    cfg = _base_cfg(_need(llm, "--llm", path), _need(vision, "--vision", path), template)
    model = _new_model(cfg, dtype, device)
    load_with_table(model.projector, read_projector(path), {k: k for k in _projector_names()}, dtype)
    for prefix, part, table, key, alpha in (("llm.", model.llm, llama.HF_KEYS, "llm_lora", lora_alpha),
                                            ("visual_encoder.", model.vision, clip.HF_KEYS, "vision_lora",
                                             vision_lora_alpha)):
        keys = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        adapters = {k: v for k, v in keys.items() if ".lora_" in k}
        if adapters:
            targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapters})
            r = next(v.shape[0] for k, v in adapters.items() if ".lora_A." in k)
            lora.inject_lora(part, targets, r, alpha, 0.0)
            lora.load_adapter_state(part, adapters, lora.hf_name_mapper(table)[0])
            cfg[key] = {"r": r, "alpha": alpha, "dropout": 0.05, "targets": targets}
        elif keys:  # a fully trained part (XTuner's full-LLM finetune saves every llm.* key)
            load_with_table(part, DictReader(keys), table, dtype)
            if prefix == "llm.":
                cfg["llm_mode"] = "full"
    if cfg["llm_lora"]:
        cfg["llm_mode"] = "lora"
    return model.eval(), load_tokenizer(cfg["llm"]), cfg


def _load_official(path, hf, dtype, device, template):
    tcfg = llama.LlamaConfig.from_hf_config(hf)
    reader = CheckpointReader(path)
    has_tower = any(k.startswith("model.vision_tower.vision_tower.") for k in reader.keys())
    vision_path = None if has_tower else Path(hf.get("mm_vision_tower", ""))
    if has_tower:
        vcfg = clip.CLIPConfig.from_hf_config(read_json(path / "vision_config.json")) \
            if (path / "vision_config.json").exists() else _infer_clip_config(reader)
    else:
        if not (vision_path / "config.json").exists():
            raise ValueError(f"{path}: the vision tower is not in the folder and mm_vision_tower={hf.get('mm_vision_tower')!r} "
                             "is not a local folder (we never download)")
        vcfg = clip.CLIPConfig.from_hf_config(read_json(vision_path / "config.json"))
    with torch.device("meta"):
        model = LLaVA(clip.CLIPVisionTower(vcfg), Projector(hf.get("mm_hidden_size", vcfg.hidden_size), tcfg.hidden_size),
                      llama.Llama(tcfg), hf.get("mm_vision_select_layer", -2))
    table = dict(OFFICIAL_KEYS)
    if not has_tower:
        table = {k: v for k, v in table.items() if not k.startswith("model.vision_tower.")}
        clip_model = clip.load_clip(vision_path, dtype=dtype, device=device)
        model.vision = clip_model
        with torch.device("meta"):
            rest = torch.nn.Module()
            rest.llm, rest.projector = model.llm, model.projector
        load_with_table(rest, reader, table, dtype=dtype, device=device)
        model.llm, model.projector = rest.llm, rest.projector
    else:
        load_with_table(model, reader, table, dtype=dtype, device=device)
    model.llm.init_rope(device)
    cfg = {"layout": "official", "template": template, "select_layer": model.select_layer,
           "image_mode": "pad" if hf.get("image_aspect_ratio", "pad") == "pad" else "crop",
           "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches}
    return model.eval(), load_tokenizer(path), cfg


def _infer_clip_config(reader):
    pre = "model.vision_tower.vision_tower.vision_model."
    hidden, _, patch, _ = reader.shape(pre + "embeddings.patch_embedding.weight")
    n_pos = reader.shape(pre + "embeddings.position_embedding.weight")[0]
    layers = 1 + max(int(k[len(pre + "encoder.layers."):].split(".")[0]) for k in reader.keys()
                     if k.startswith(pre + "encoder.layers."))
    inter = reader.shape(pre + "encoder.layers.0.mlp.fc1.weight")[0]
    side = round((n_pos - 1) ** 0.5) * patch
    return clip.CLIPConfig(image_size=side, patch_size=patch, hidden_size=hidden, num_layers=layers,
                           num_heads=max(1, hidden // 64), intermediate_size=inter)


# ----------------------------------------------------------------------------------------------------------------
# Writing


def merged(model):
    """The model with every LoRA merged and every NF4 weight dequantized (in place)."""
    lora.merge_lora(model.llm)
    lora.merge_lora(model.vision)
    return model


def _state(module, prefix):
    return {prefix + k: v for k, v in module.state_dict().items()}


def write_hf(model, tok, cfg, out, dtype, shard):
    """transformers' LlavaForConditionalGeneration folder, as `save_pretrained` writes it (pre-4.52 key layout, which
    every transformers version loads), with `<image>` and `<pad>` added to the tokenizer and the vocabulary padded
    to a multiple of 64 as xtuner/llava-llama-3-8b-v1_1-transformers has it (128257, 128258, 128320 for Llama-3)."""
    model = merged(model)
    sd = {**_state(model.llm, "llm."), **_state(model.vision, "vision."), **_state(model.projector, "projector.")}
    sd = rename_state_dict(sd, invert_table(hf_llava_keys()))
    vocab = model.llm.embed_tokens.weight.shape[0]
    image_id, pad_id = tok.vocab_size + 1, tok.vocab_size + 2
    padded = max(vocab, -(-(pad_id + 1) // 64) * 64)
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key in sd and sd[key].shape[0] < padded:
            w = sd[key]
            # new rows: the mean row (deterministic; XTuner draws them at random); they are never looked up with
            # meaning: <image> positions are overwritten by image features and <pad> is masked out
            extra = w.float().mean(0, keepdim=True).expand(padded - w.shape[0], -1).to(w.dtype)
            sd[key] = torch.cat([w, extra])
    save_safetensors({k: v.to(dtype) for k, v in sd.items()}, out, max_shard_bytes=shard)
    tcfg = model.llm.cfg.to_hf_config()
    tcfg["vocab_size"] = padded
    vcfg = model.vision.cfg.to_hf_config()
    write_json(Path(out) / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_id, "pad_token_id": pad_id, "ignore_index": -100,
        "projector_hidden_act": "gelu", "vision_feature_layer": model.select_layer,
        "vision_feature_select_strategy": "default", "image_seq_length": model.vision.cfg.num_patches,
        "multimodal_projector_bias": True, "tie_word_embeddings": tcfg.get("tie_word_embeddings", False),
        "text_config": tcfg, "vision_config": vcfg, "torch_dtype": str(dtype).removeprefix("torch.")})
    write_hf_tokenizer(tok, out, added={"<image>": image_id, "<pad>": pad_id})
    size = model.vision.cfg.image_size
    write_json(Path(out) / "preprocessor_config.json", CLIP_PREPROCESSOR | {
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}})


def write_official(model, tok, cfg, out, dtype, shard):
    model = merged(model)
    sd = {**_state(model.llm, "llm."), **_state(model.vision, "vision."), **_state(model.projector, "projector.")}
    sd = rename_state_dict(sd, invert_table(OFFICIAL_KEYS))
    save_safetensors({k: v.to(dtype) for k, v in sd.items()}, out, max_shard_bytes=shard)
    vc = model.vision.cfg
    conf = model.llm.cfg.to_hf_config() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "image_aspect_ratio": "pad",
        "mm_hidden_size": vc.hidden_size, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": model.select_layer, "mm_vision_tower": str(cfg.get("vision", "")),
        "unfreeze_mm_vision_tower": True, "use_mm_proj": True, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch.")}
    write_json(Path(out) / "config.json", conf)
    write_json(Path(out) / "vision_config.json", vc.to_hf_config())
    write_hf_tokenizer(tok, out)
    write_json(Path(out) / "preprocessor_config.json", CLIP_PREPROCESSOR | {
        "crop_size": {"height": vc.image_size, "width": vc.image_size}, "size": {"shortest_edge": vc.image_size}})


def write_xtuner(model, tok, cfg, out, dtype, shard):
    """XTuner's layout: projector/ always; llm_adapter/ and visual_encoder_adapter/ (PEFT) when trained with LoRA;
    the full LLM at the root when it was trained in full."""
    out = Path(out)
    sd = rename_state_dict(model.projector.state_dict(), invert_table(XTUNER_PROJECTOR_KEYS))
    save_safetensors({k: v.to(dtype) for k, v in sd.items()}, out / "projector")
    p = cfg["projector"] if "projector" in cfg else {"in": model.projector.linear_1.in_features,
                                                    "out": model.projector.linear_2.out_features}
    write_json(out / "projector" / "config.json", {
        "architectures": ["ProjectorModel"], "model_type": "projector", "bias": True, "depth": 2,
        "hidden_act": "gelu", "visual_hidden_size": p["in"], "llm_hidden_size": p["out"],
        "torch_dtype": str(dtype).removeprefix("torch.")})
    write_adapters(model, cfg, out, llm_name="llm_adapter", vision_name="visual_encoder_adapter")
    if cfg.get("llm_mode") == "full":
        write_llm(model, tok, cfg, out, dtype, shard, merge=False)


def write_adapters(model, cfg, out, llm_name="llm_adapter", vision_name="vision_adapter"):
    out = Path(out)
    wrote = False
    for part, table, key, name, task in ((model.llm, llama.HF_KEYS, "llm_lora", llm_name, "CAUSAL_LM"),
                                         (model.vision, clip.HF_KEYS, "vision_lora", vision_name, None)):
        c = cfg.get(key)
        if c:
            lora.save_adapter(part, out / name, lora.hf_name_mapper(table)[0], c["r"], c["alpha"], c["dropout"],
                              c["targets"], task_type=task, base_model=cfg.get("llm" if part is model.llm else "vision"))
            wrote = True
    return wrote


def write_llm(model, tok, cfg, out, dtype, shard, merge=True):
    if merge:
        lora.merge_lora(model.llm)
    llama.save_llama(model.llm, out, dtype=dtype, max_shard_bytes=shard)
    write_hf_tokenizer(tok, out)


def write_clip(model, out, dtype):
    lora.merge_lora(model.vision)
    clip.save_clip(model.vision, out, dtype=dtype)
    vc = model.vision.cfg
    write_json(Path(out) / "preprocessor_config.json", CLIP_PREPROCESSOR | {
        "crop_size": {"height": vc.image_size, "width": vc.image_size}, "size": {"shortest_edge": vc.image_size}})


# ----------------------------------------------------------------------------------------------------------------
# Verification: the export must give the source model's logits


def probe_logits(model, tok, cfg, image=None):
    """Logits of a fixed prompt about a fixed image (a colour gradient unless one is given)."""
    import numpy as np
    from PIL import Image
    size = cfg.get("image_size", model.vision.cfg.image_size)
    if image is None:
        ramp = np.linspace(0, 255, size, dtype=np.uint8)
        image = Image.fromarray(np.stack([np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size)),
                                          np.full((size, size), 128, np.uint8)], -1))
    pixels = clip.preprocess(image, size, pad_to_square=True)[None]
    ids = data.encode_prompt(tok, data.TEMPLATES[cfg.get("template", "llama3_chat")],
                             "<image>\nWhat is in this picture?", image_tokens=model.vision.cfg.num_patches)
    device = model.llm.embed_tokens.weight.device
    out = model.logits(torch.tensor([ids], device=device), pixels.to(device))[0]  # (T, V)
    return out[:, :tok.vocab_size]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="a model in any supported layout (default: runs/latest)", nargs="?", default="runs/latest")
    p.add_argument("--to", required=True, choices=["hf", "xtuner", "official", "llm", "clip", "adapters"])
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="write fp32 (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 2GB, 500MB")
    p.add_argument("--llm", help="base LLM folder, for sources that only hold what was trained")
    p.add_argument("--vision", help="base CLIP folder, likewise")
    p.add_argument("--template", default="llama3_chat", help="for sources that do not name one")
    p.add_argument("--lora-alpha", type=int, default=16, help="LLM LoRA alpha of an XTuner .pth (not stored in it)")
    p.add_argument("--vision-lora-alpha", type=int, default=16)
    p.add_argument("--verify", action="store_true", help="reload the export and compare logits with the source")
    args = p.parse_args(argv)

    src = Path(args.src)
    if str(args.src) == "runs/latest" and not src.exists():
        print("no runs/latest: train a model first (make demo) or name the source folder", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    shard = _parse_size(args.max_shard_size)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty: choose a new --out", file=sys.stderr)
        return 2
    load = lambda: load_any(src, dtype=torch.float32, device="cpu", llm=args.llm, vision=args.vision,
                            template=args.template, lora_alpha=args.lora_alpha,
                            vision_lora_alpha=args.vision_lora_alpha)
    model, tok, cfg = load()
    reference = probe_logits(model, tok, cfg) if args.verify else None
    if args.to == "hf":
        write_hf(model, tok, cfg, out, dtype, shard)
    elif args.to == "official":
        write_official(model, tok, cfg, out, dtype, shard)
    elif args.to == "xtuner":
        write_xtuner(model, tok, cfg, out, dtype, shard)
    elif args.to == "llm":
        write_llm(model, tok, cfg, out, dtype, shard)
    elif args.to == "clip":
        write_clip(model, out, dtype)
    elif args.to == "adapters":
        if not write_adapters(model, cfg, out):
            print("this model has no LoRA adapters to write", file=sys.stderr)
            return 2
    print(f"wrote {args.to} layout to {out}")
    if args.verify:
        if args.to in ("llm", "clip", "adapters"):
            print("--verify compares whole LLaVA models; it does not apply to --to", args.to)
            return 0
        back, tok2, cfg2 = load_any(out, dtype=torch.float32, llm=args.llm, vision=args.vision,
                                    template=args.template)
        got = probe_logits(back, tok2, cfg2 | {"template": cfg.get("template", "llama3_chat")})
        diff = (got - reference).abs().max().item()
        scale = reference.abs().max().item()
        # fp32 exports must match to rounding; bf16 ones to bf16's ~3 significant digits on the logit scale
        tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, scale)
        same = bool((got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.99)
        print(f"verify: max |logit difference| {diff:.3g} (tolerance {tol:.3g}), argmax agreement "
              f"{'ok' if same else 'DIFFERS'}")
        if diff > tol or not same:
            return 1
    return 0


def _parse_size(s):
    s = s.strip().upper()
    for unit, mult in (("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


if __name__ == "__main__":
    sys.exit(main())
