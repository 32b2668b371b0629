"""Convert a trained LLaVA between every layout the ecosystem uses.

    python convert.py runs/latest --to hf --out llava-hf                # transformers LlavaForConditionalGeneration
    python convert.py runs/latest --to xtuner --out llava-xtuner        # projector/ + llm_adapter/ + ... (XTuner)
    python convert.py runs/latest --to official --out llava-official    # haotian-liu/LLaVA `llava_llama`
    python convert.py runs/latest --to llm --out llama-merged           # the LLM alone, LoRA merged, in its base's
                                                                        # layout (HF Llama, or InternLM2 + its *.py)
    python convert.py runs/latest --to clip --out clip-merged           # the vision tower alone, LoRA merged
    python convert.py runs/latest --to adapters --out adapters          # PEFT adapters (as trained, not merged)
    python convert.py work_dirs/x/iter_2181.pth --llm META_LLAMA --vision CLIP --to hf --out llava-hf
    python convert.py runs/x/checkpoints/step_500 --to llm --out merged  # a train.py checkpoint (exported first)

Sources: our run folder (llava.json; a text-only `--stage sft` run converts `--to llm` or `--to adapters`), a
train.py checkpoint (`checkpoints/step_N`: `train.py export` turns it into a run folder first), a plain Llama /
InternLM2 folder, any of the layouts above, XTuner's `iter_N.pth` (a file, or the DeepSpeed folder XTuner writes
under that name) and XTuner's published projector folder. XTuner's LoRA on an InternLM2 LLM sits on the packed
`wqkv` (and the `output` head), which our separate q/k/v projections cannot hold: it is merged at load.
Everything is written as safetensors (bf16 by default, `--fp32` on request), sharded with an index past
`--max-shard-size`. `--verify` reloads the export and compares its logits with the source model's on a probe image
and prompt (`--to llm`: on the prompt alone).

Every layout is a key table: HF's lives in model.py (`hf_llava_keys`), Llama's in llama.py, CLIP's in clip.py;
the XTuner and official ones below. A QLoRA run is dequantized, then merged (XTuner refuses to export it).

Two spellings of the CLIP keys exist: `vision_model.encoder...` (the hub checkpoints, transformers 4.x, XTuner) and
`encoder...` (what transformers >= 5 builds and saves). Every weights file here uses the first, which every
transformers version loads; the PEFT adapter of `--to adapters` uses the second, because PEFT matches adapter keys
against the module tree of the transformers installed (`PeftModel.from_pretrained` on a 5.x `CLIPVisionModel`).
XTuner's `visual_encoder_adapter/` keeps XTuner's spelling. Both spellings are read.

XTuner's `.pth` files are pickles that also hold mmengine objects. They are read with a restricted unpickler that
builds tensors and plain containers only and turns every other class into an inert placeholder: no code from the
file is ever run (SPEC §4).
"""

import argparse
import pickle
import shutil
import sys
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image

import clip
import data
import llama
import lora
from model import LLM_MODEL_TYPES, PROJECTOR_KEYS, LLaVA, Projector, _copy_tokenizer, hf_llava_keys, load_model
from tokenizer import TiktokenTokenizer, load_tokenizer, write_hf_tokenizer
from weights import (CheckpointReader, invert_table, load_with_table, read_json, rename_state_dict,
                     save_safetensors, write_json)

# XTuner's projector folder: an nn.Sequential, so its Linear layers are `model.0` and `model.2` (`model.1` is GELU)
XTUNER_PROJECTOR_KEYS = {f"model.{j}.{p}": f"linear_{i}.{p}" for i, j in ((1, 0), (2, 2))
                         for p in ("weight", "bias")}

# haotian-liu/LLaVA `LlavaLlamaForCausalLM`: the Llama keys unchanged, then the projector and the tower inside `model.`
OFFICIAL_KEYS = {**{k: (None if v is None else "llm." + v) for k, v in llama.HF_KEYS.items()},
                 **{"model.vision_tower.vision_tower." + k: (None if v is None else "vision." + v)
                    for k, v in clip.HF_KEYS.items()},
                 **{"model.mm_projector." + k[len("model."):]: "projector." + v
                    for k, v in XTUNER_PROJECTOR_KEYS.items()}}

CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's preprocessor_config.json (the size is the tower's)
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": list(clip.CLIP_MEAN), "image_std": list(clip.CLIP_STD), "image_processor_type": "CLIPImageProcessor",
    "resample": 3, "rescale_factor": 1 / 255}


# ----------------------------------------------------------------------------------------------------------------
# Reading XTuner's pickles without running them


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
    # weights_only=True would refuse the mmengine objects outright; the restricted unpickler keeps them as inert stubs
    return torch.load(path, map_location="cpu", pickle_module=_RestrictedPickle, weights_only=False)


def read_xtuner_pth(path):
    """The trainable-only state dict of an XTuner checkpoint: `iter_N.pth` as a file ({"meta", "state_dict", ...})
    or as the DeepSpeed folder XTuner writes under that name (`mp_rank_00_model_states.pt` -> "module")."""
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
    if not isinstance(sd, dict) or not any(str(k).startswith("projector.") for k in sd):
        raise ValueError(f"{path}: no `projector.*` weights found; is this an XTuner LLaVA checkpoint?")
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _is_projector_folder(path):
    return (path / "config.json").exists() and read_json(path / "config.json").get("model_type") == "projector"


def read_projector(path, state_dict=None):
    """Projector weights in our names (`linear_1.weight`, ...) from: our run folder, XTuner's export folder or its
    projector/ folder (`model.0.*`, `model.2.*`), or an XTuner iter_N.pth (`projector.model.*`; or its state dict)."""
    path = Path(path)
    if (path / "model" / "llava.json").exists():
        path = path / "model"
    if (path / "projector.safetensors").exists():
        return dict(CheckpointReader(path / "projector.safetensors").items())
    if (path / "projector").is_dir():
        path = path / "projector"
    if path.is_dir() and _is_projector_folder(path):
        bin_file = path / "pytorch_model.bin"  # XTuner's default (it saves safetensors only when asked)
        sd = safe_torch_load(bin_file) if bin_file.exists() else dict(CheckpointReader(path).items())
        return rename_state_dict(sd, XTUNER_PROJECTOR_KEYS)
    sd = read_xtuner_pth(path) if state_dict is None else state_dict
    return rename_state_dict({k[len("projector."):]: v for k, v in sd.items() if k.startswith("projector.")},
                             XTUNER_PROJECTOR_KEYS)


# ----------------------------------------------------------------------------------------------------------------
# Reading every layout into our modules


def load_any(path, dtype=torch.bfloat16, device="cpu", llm=None, vision=None, template="llama3_chat",
             lora_alpha=None, vision_lora_alpha=16):
    """Any supported layout -> (LLaVA, tokenizer, cfg). `llm` / `vision` name the base models when the layout only
    holds what was trained (XTuner's folder and .pth, a projector folder). lora_alpha: of an XTuner .pth's LLM
    adapter (not stored in it); None = XTuner's recipes' value, 256 for an InternLM2 LLM, else 16."""
    path = Path(path)
    if path.is_dir() and ((path / "llava.json").exists() or (path / "model" / "llava.json").exists()):
        return load_model(path, dtype, device)
    # one of train.py's checkpoints (or a run folder that only has checkpoints): DeepSpeed files, like XTuner's
    # iter_N.pth folder, but ours name their run's flags (trainer_state.json), so `train.py export` rebuilds model/
    if (path / "trainer_state.json").exists() or (path / "checkpoints").is_dir():
        import train

        return load_model(train.export_checkpoint(path), dtype, device)
    kind = read_json(path / "config.json").get("model_type") if (path / "config.json").exists() else None
    if kind == "llava":
        model, tok, cfg = load_model(path, dtype, device)
        return model, tok, {**cfg, "llm_mode": "full", "vision_mode": "full"}  # every weight is in the folder
    if kind == "llava_llama":
        return _load_official(path, dtype, device, template)
    if (path / "projector").is_dir() or kind == "projector" or path.suffix == ".pth" or \
            (path / "mp_rank_00_model_states.pt").exists():
        return _load_xtuner(path, dtype, device, llm, vision, template, lora_alpha, vision_lora_alpha)
    if kind in LLM_MODEL_TYPES:  # a plain LLM folder (XTuner's full LLM sits next to projector/, read above)
        return load_model(path, dtype, device)
    raise ValueError(f"{path}: not a layout convert.py knows (our run folder with llava.json or its checkpoints/"
                     "step_N, an HF LLaVA folder, an XTuner folder with projector/, an official llava_llama folder, "
                     "an XTuner iter_N.pth, or a plain Llama / InternLM2 folder)")


def _need(value, flag, what):
    if not value:
        raise ValueError(f"{what} does not contain the base {flag[2:]}: pass {flag} PATH (an HF folder)")
    return value


def _read_peft(folder):
    """(state dict, adapter_config) of a PEFT folder; XTuner writes adapter_model.bin unless asked for safetensors."""
    conf = read_json(folder / "adapter_config.json")
    if (folder / "adapter_model.safetensors").exists():
        return dict(CheckpointReader(folder / "adapter_model.safetensors").items()), conf
    return safe_torch_load(folder / "adapter_model.bin"), conf


def _add_adapter(part, sd, table, alpha, dropout):
    """Give `part` the LoRA adapter held in `sd` (PEFT keys, XTuner's `.default` allowed): targets and rank are read
    off the keys, so the file decides, not a guess."""
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in sd})
    r = next(v.shape[0] for k, v in sd.items() if ".lora_A." in k)
    lora.inject_lora(part, targets, r, alpha, 0.0)
    lora.load_adapter(part, sd, lora.hf_name_mapper(table)[0], config={"r": r, "lora_alpha": alpha})
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def _vision_table(keys):
    """CLIP key table for either spelling (module docstring), judged from a file's keys."""
    return clip.HF_KEYS if any("vision_model." in k for k in keys) else clip.HF_KEYS_UNPREFIXED


def _load_xtuner(path, dtype, device, llm, vision, template, lora_alpha, vision_lora_alpha):
    """XTuner's export folder (projector/, llm_adapter/, visual_encoder_adapter/, visual_encoder/, a full LLM at its
    root), its projector folder alone, or its training checkpoint iter_N.pth, which holds the trainable keys only:
    `projector.model.*`, `llm.base_model.model.*.lora_{A,B}.default.weight` (LoRA) or `llm.model.*` (full), and
    the same under `visual_encoder.`. LoRA alpha is not in a .pth: XTuner's Llama-3 recipes use 16, its
    InternLM2 ones 256 (lora_alpha=None picks by the LLM). An InternLM2 LLM's adapter is merged into its weights
    (llama.merge_internlm2_adapter): the model then holds a full LLM (cfg llm_mode "full")."""
    path = Path(path)
    folder = path.is_dir() and ((path / "projector").is_dir() or _is_projector_folder(path))
    sd = {} if folder else read_xtuner_pth(path)
    root_llm = folder and (path / "projector").is_dir() and (path / "config.json").exists()  # a fully trained LLM
    own_tower = folder and (path / "visual_encoder").is_dir()  # a fully trained vision tower
    llm_path = path if root_llm else _need(llm, "--llm", path)
    vision_path = path / "visual_encoder" if own_tower else _need(vision, "--vision", path)
    tcfg = llama.LlamaConfig.from_hf_config(read_json(Path(llm_path) / "config.json"))
    vcfg = clip.CLIPConfig.from_hf_config(read_json(Path(vision_path) / "config.json"))
    cfg = {"llm": str(llm_path), "vision": str(vision_path), "template": template, "select_layer": -2,
           "image_mode": "pad", "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches,
           "projector": {"in": vcfg.hidden_size, "hidden": tcfg.hidden_size, "out": tcfg.hidden_size},
           "llm_mode": "full" if root_llm else "frozen", "llm_lora": None,
           "vision_mode": "full" if own_tower else "frozen", "vision_lora": None}
    model = LLaVA(clip.load_clip(vision_path, dtype, device), Projector(vcfg.hidden_size, tcfg.hidden_size),
                  llama.load_llama(llm_path, dtype, device), -2)
    internlm2 = tcfg.layout == "internlm2"
    if lora_alpha is None:
        lora_alpha = 256 if internlm2 else 16  # reference §1.6: InternLM2 QLoRA r 512 / alpha 256; Llama-3 alpha 16
    load_with_table(model.projector, read_projector(path, None if folder else sd), PROJECTOR_KEYS, dtype, device)
    for prefix, sub, part, key, alpha in (("llm.", "llm_adapter", model.llm, "llm", lora_alpha),
                                          ("visual_encoder.", "visual_encoder_adapter", model.vision, "vision",
                                           vision_lora_alpha)):
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if folder and (path / sub).is_dir():
            own, conf = _read_peft(path / sub)
            alpha, dropout = conf["lora_alpha"], conf.get("lora_dropout", 0.0)
        else:
            dropout = 0.05  # XTuner's recipes; only written back into adapter_config.json
        table = llama.HF_KEYS if key == "llm" else _vision_table(own)
        plain = [k for k in own if ".lora_" not in k]
        if plain and len(plain) < len(own):
            raise ValueError(f"{path}: `{prefix}*` mixes LoRA and plain weights (e.g. {plain[:3]}); convert.py reads "
                             "an adapter or a fully trained part, not both")
        if plain:  # a fully trained part: XTuner saves every one of its weights
            if key == "llm" and internlm2:  # InternLM2's names and packed wqkv
                load_with_table(part, llama.InternLM2Reader(own, tcfg), llama.INTERNLM2_KEYS, dtype, device)
            else:
                load_with_table(part, own, table, dtype, device)
            cfg[f"{key}_mode"] = "full"
        elif own and key == "llm" and internlm2:
            # merged into the full-precision weights now, before anything could quantize them
            llama.merge_internlm2_adapter(part, own, config={"lora_alpha": alpha})
            cfg["llm_mode"] = "full"
        elif own:
            cfg[f"{key}_lora"] = _add_adapter(part, own, table, alpha, dropout)
            if key == "llm":
                cfg["llm_mode"] = "lora"
    return model.to(device).eval(), load_tokenizer(llm_path), cfg


def _load_official(path, dtype, device, template):
    """haotian-liu/LLaVA's folder. The tower is in it when it was trained (XTuner's export puts it there whenever
    it had LoRA or was unfrozen); otherwise `mm_vision_tower` must name a local CLIP folder."""
    hf = read_json(path / "config.json")
    tcfg = llama.LlamaConfig.from_hf_config(hf)
    reader = CheckpointReader(path)
    has_tower = any(k.startswith("model.vision_tower.vision_tower.") for k in reader.keys())
    if has_tower:  # official folders hold no CLIP config (ours adds one); the released ones all use ViT-L/14-336,
        # and another tower fails the strict load below with its keys named
        vcfg = clip.CLIPConfig.from_hf_config(read_json(path / "vision_config.json")) \
            if (path / "vision_config.json").exists() else clip.CLIPConfig.from_name("clip-vit-l-14-336")
    else:
        vision_path = Path(hf.get("mm_vision_tower", ""))
        if not (vision_path / "config.json").exists():
            raise ValueError(f"{path}: the vision tower is not in the folder and mm_vision_tower="
                             f"{hf.get('mm_vision_tower')!r} is not a local folder (we never download)")
        vcfg = clip.CLIPConfig.from_hf_config(read_json(vision_path / "config.json"))
    with torch.device("meta"):
        model = LLaVA(clip.CLIPVisionTower(vcfg), Projector(hf.get("mm_hidden_size", vcfg.hidden_size),
                                                            tcfg.hidden_size), llama.Llama(tcfg),
                      hf.get("mm_vision_select_layer", -2))
    if has_tower:
        load_with_table(model, reader, OFFICIAL_KEYS, dtype=dtype, device=device)
    else:  # the same strict load over the two parts that are in the file; the tower comes from its own folder
        model.vision = clip.load_clip(vision_path, dtype=dtype, device=device)
        table = {k: v for k, v in OFFICIAL_KEYS.items() if not k.startswith("model.vision_tower.")}
        load_with_table(nn.ModuleDict({"llm": model.llm, "projector": model.projector}), reader, table, dtype, device)
    model.llm.init_rope(device)
    cfg = {"layout": "official", "template": template, "select_layer": model.select_layer,
           "image_mode": "pad" if hf.get("image_aspect_ratio", "pad") == "pad" else "crop",
           "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches, "vision": hf.get("mm_vision_tower"),
           "tokenizer": str(path), "llm_mode": "full", "vision_mode": "full" if has_tower else "frozen"}
    return model.eval(), load_tokenizer(path), cfg


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _cast(sd, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _full_state(model):
    """Our names for the whole LLaVA with every LoRA merged and every NF4 weight dequantized (the model is changed in
    place: its LoRA layers become plain Linear layers)."""
    lora.merge_lora(model.llm)
    lora.merge_lora(model.vision)
    sd = {f"{part}.{k}": v for part in ("llm", "vision", "projector")
          for k, v in getattr(model, part).state_dict().items()}
    if model.llm.cfg.tie_word_embeddings:  # one matrix, stored once (as the embedding), as HF does
        del sd["llm.lm_head.weight"]
    return sd


def _write_preprocessor(folder, size):
    write_json(Path(folder) / "preprocessor_config.json", CLIP_PREPROCESSOR | {
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}})


def _write_tokenizer(tok, cfg, out):
    """The source's own tokenizer files when we know them (they keep its chat template), and a tokenizer.json
    written from ours when they hold none (transformers' AutoTokenizer needs one)."""
    src = cfg.get("tokenizer") or cfg.get("llm")
    if src and Path(src).is_dir() and Path(src).resolve() != Path(out).resolve():
        _copy_tokenizer(src, out)
    if not (Path(out) / "tokenizer.json").exists() and isinstance(tok, TiktokenTokenizer):
        write_hf_tokenizer(tok, out)


def write_hf(model, tok, cfg, out, dtype, shard):
    """transformers' LlavaForConditionalGeneration folder, as `save_pretrained` writes it (pre-4.52 key layout, which
    every transformers version loads), with `<image>` and `<pad>` added to the tokenizer and the vocabulary padded
    to a multiple of 64 as xtuner/llava-llama-3-8b-v1_1-transformers has it (128257, 128258, 128320 for Llama-3)."""
    sd = rename_state_dict(_full_state(model), invert_table(hf_llava_keys()))
    # XTuner adds the tokens to the 128,256-id HF tokenizer: "<image>" lands one past 128,256 ids, "<pad>" after it
    # (an HF LLaVA source already has them, and keeps their ids)
    image_id = tok.special_tokens.get("<image>", tok.vocab_size + 1)
    pad_id = tok.special_tokens.get("<pad>", image_id + 1)
    padded = -(-max(model.llm.cfg.vocab_size, pad_id + 1) // 64) * 64  # a multiple of 64, as XTuner's resize
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        if key not in sd:  # tied embeddings: stored once
            continue
        w = sd[key]
        # new rows: the mean row (deterministic; XTuner draws them around it with a 1e-5-scaled covariance). They
        # carry no meaning: <image> positions are overwritten by image features and <pad> is masked out
        sd[key] = torch.cat([w, w.float().mean(0, keepdim=True).expand(padded - w.shape[0], -1).to(w.dtype)])
    # the tokenizer first: it is the part that can refuse (a sentencepiece one), before any weights are written
    write_hf_tokenizer(tok, out, added={n: i for n, i in (("<image>", image_id), ("<pad>", pad_id))
                                        if n not in tok.special_tokens})
    save_safetensors(_cast(sd, dtype), out, max_shard_bytes=shard)
    tcfg = {**model.llm.cfg.to_hf_config(), "vocab_size": padded, "pad_token_id": pad_id}
    vc = model.vision.cfg
    write_json(Path(out) / "config.json", {
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
        "image_token_index": image_id, "pad_token_id": pad_id, "ignore_index": -100,
        "projector_hidden_act": "gelu", "vision_feature_layer": model.select_layer,
        "vision_feature_select_strategy": "default", "image_seq_length": vc.num_patches,
        "multimodal_projector_bias": True, "tie_word_embeddings": tcfg["tie_word_embeddings"],
        "text_config": tcfg, "vision_config": vc.to_hf_config(), "torch_dtype": str(dtype).removeprefix("torch.")})
    _write_preprocessor(out, vc.image_size)


def write_official(model, tok, cfg, out, dtype, shard):
    """haotian-liu/LLaVA's `llava_llama` folder with the tower inside (as XTuner's `--save-format official` writes it
    for a trained tower), plus `vision_config.json` so that it reads back without the base CLIP."""
    sd = rename_state_dict(_full_state(model), invert_table(OFFICIAL_KEYS))
    save_safetensors(_cast(sd, dtype), out, max_shard_bytes=shard)
    vc = model.vision.cfg
    write_json(Path(out) / "config.json", model.llm.cfg.to_hf_config() | {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama", "image_aspect_ratio": "pad",
        "mm_hidden_size": vc.hidden_size, "mm_projector_type": "mlp2x_gelu", "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": model.select_layer, "mm_vision_tower": str(cfg.get("vision") or ""),
        "unfreeze_mm_vision_tower": True, "use_mm_proj": True, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch.")})
    write_json(Path(out) / "vision_config.json", vc.to_hf_config())
    _write_tokenizer(tok, cfg, out)
    _write_preprocessor(out, vc.image_size)


def write_xtuner(model, tok, cfg, out, dtype, shard):
    """XTuner's layout: projector/ always; llm_adapter/ and visual_encoder_adapter/ (PEFT, XTuner's key spelling)
    when trained with LoRA; the full LLM at the root and the full tower in visual_encoder/ when trained in full."""
    out = Path(out)
    p = model.projector
    save_safetensors(_cast(rename_state_dict(p.state_dict(), invert_table(XTUNER_PROJECTOR_KEYS)), dtype),
                     out / "projector")
    write_json(out / "projector" / "config.json", {
        "architectures": ["ProjectorModel"], "model_type": "projector", "bias": True, "depth": 2,
        "hidden_act": "gelu", "visual_hidden_size": p.linear_1.in_features,
        "llm_hidden_size": p.linear_2.out_features, "torch_dtype": str(dtype).removeprefix("torch.")})
    write_adapters(model, cfg, out, "llm_adapter", "visual_encoder_adapter", vision_table=clip.HF_KEYS)
    if cfg.get("llm_mode") == "full":
        write_llm(model, tok, cfg, out, dtype, shard)
    if cfg.get("vision_mode") == "full":
        write_clip(model, out / "visual_encoder", dtype)


def write_adapters(model, cfg, out, llm_name="llm_adapter", vision_name="vision_adapter",
                   vision_table=clip.HF_KEYS_UNPREFIXED):
    """PEFT folders of the LoRA adapters as trained (not merged); False when the model has none."""
    wrote = False
    for part, table, key, name, task in ((model.llm, llama.HF_KEYS, "llm", llm_name, "CAUSAL_LM"),
                                         (model.vision, vision_table, "vision", vision_name, None)):
        c = cfg.get(f"{key}_lora")
        if c:
            lora.save_adapter(part, Path(out) / name, lora.hf_name_mapper(table)[0], c["r"], c["alpha"],
                              c["dropout"], c["targets"], task_type=task, base_model=cfg.get(key))
            wrote = True
    return wrote


def write_llm(model, tok, cfg, out, dtype, shard):
    """The LLM alone, LoRA merged and NF4 dequantized, in its base's own layout: an HF LlamaForCausalLM folder, or an
    InternLM2ForCausalLM one (llama.save_llama keeps the layout it read) with the base's remote-code `*.py` files,
    which transformers runs it with (trust_remote_code) and its config.json's auto_map names."""
    lora.merge_lora(model.llm)
    llama.save_llama(model.llm, out, dtype=dtype, max_shard_bytes=shard)
    _write_tokenizer(tok, cfg, out)
    src = Path(cfg.get("llm") or "")
    if cfg.get("llm") and src.is_dir() and src.resolve() != Path(out).resolve():
        for f in sorted(src.glob("*.py")):
            shutil.copyfile(f, Path(out) / f.name)


def write_clip(model, out, dtype):
    """The tower alone as an HF CLIPVisionModel folder, LoRA merged."""
    lora.merge_lora(model.vision)
    clip.save_clip(model.vision, out, dtype=dtype)
    _write_preprocessor(out, model.vision.cfg.image_size)


WRITERS = {"hf": write_hf, "official": write_official, "xtuner": write_xtuner, "llm": write_llm,
           "clip": lambda model, tok, cfg, out, dtype, shard: write_clip(model, out, dtype)}


# ----------------------------------------------------------------------------------------------------------------
# Verification: the export must give the source model's logits


def probe_logits(model, tok, cfg, text_only=False):
    """Logits (T, V) of a fixed prompt about a fixed picture: a colour gradient at the tower's input size. text_only
    (the LLM alone, for --to llm): the prompt's text only, with no template (a plain LLM folder names none)."""
    device = model.llm.embed_tokens.weight.device
    if text_only:
        ids = [tok.bos_id] * (tok.bos_id is not None) + tok.encode("What is in this picture?")
        return model.logits(torch.tensor([ids], device=device))[0]  # (T, V)
    g = Image.linear_gradient("L")  # 256 x 256, dark at the top, light at the bottom
    image = Image.merge("RGB", (g, g.rotate(90), Image.new("L", g.size, 128)))
    pixels = clip.preprocess(image, model.vision.cfg.image_size)[None]  # (1, 3, S, S)
    ids = data.encode_prompt(tok, cfg.get("template", "llama3_chat"), "<image>\nWhat is in this picture?",
                             image_tokens=model.vision.cfg.num_patches)
    return model.logits(torch.tensor([ids], device=device), pixels.to(device))[0]  # (T, V)


def verify(reference, got, dtype):
    """Compare the export's probe logits with the source's over the vocabulary both have (an HF export pads it)."""
    V = min(reference.shape[-1], got.shape[-1])
    reference, got = reference[:, :V], got[:, :V]
    diff = (got - reference).abs().max().item()
    # fp32 exports must match to rounding; bf16 ones to bf16's ~3 significant digits on the logit scale. (Within
    # the tolerance only near-ties can change the argmax, so its agreement is shown, not tested.)
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, reference.abs().max().item())
    agree = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
    print(f"verify: max |logit difference| {diff:.3g} (tolerance {tol:.3g}), argmax agreement {agree:.0%}: "
          f"{'ok' if diff <= tol else 'FAILED'}")
    return diff <= tol


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", default="runs/latest", help="a model in any supported layout")
    p.add_argument("--to", required=True, choices=[*WRITERS, "adapters"])
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="write fp32 (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 2GB, 500MB")
    p.add_argument("--llm", help="base LLM folder, for sources that only hold what was trained")
    p.add_argument("--vision", help="base CLIP folder, likewise")
    p.add_argument("--template", default="llama3_chat", help="for sources that do not name one")
    p.add_argument("--lora-alpha", type=int, default=None,
                   help="LLM LoRA alpha of an XTuner .pth (not stored in it; default: XTuner's recipes' 16, or 256 for "
                        "an InternLM2 LLM)")
    p.add_argument("--vision-lora-alpha", type=int, default=16)
    p.add_argument("--verify", action="store_true", help="reload the export and compare logits with the source")
    args = p.parse_args(argv)

    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        print(f"no model at {src}: train one first (make demo) or name the source", file=sys.stderr)
        return 2
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty: choose a new --out", file=sys.stderr)
        return 2
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    model, tok, cfg = load_any(src, dtype=torch.float32, device="cpu", llm=args.llm, vision=args.vision,
                               template=args.template, lora_alpha=args.lora_alpha,
                               vision_lora_alpha=args.vision_lora_alpha)
    if model.vision is None and args.to not in ("llm", "adapters"):
        print(f"{src} is a text-only model (no vision tower, no projector): convert it --to llm (a plain LLM folder, "
              "adapters merged) or --to adapters", file=sys.stderr)
        return 2
    check = args.verify and args.to in ("hf", "official", "xtuner", "llm")
    text_only = args.to == "llm"  # the export is the LLM alone: compare it on text
    # before the writers merge the adapters in place
    reference = probe_logits(model, tok, cfg, text_only) if check else None
    if args.to == "adapters":
        if not write_adapters(model, cfg, out):
            print(f"{src} has no LoRA adapters to write", file=sys.stderr)
            return 2
    else:
        WRITERS[args.to](model, tok, cfg, out, dtype, _parse_size(args.max_shard_size))
    print(f"wrote the {args.to} layout to {out}")
    if args.verify and not check:
        print(f"--verify compares whole LLaVA models; it does not apply to --to {args.to}")
    if check:
        back, tok2, _ = load_any(out, dtype=torch.float32, llm=args.llm or cfg.get("llm"),
                                 vision=args.vision or cfg.get("vision"), template=args.template)
        if not verify(reference, probe_logits(back, tok2, cfg, text_only), dtype):
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
