"""The one loader: every model folder the project writes or imports -> (LLaVA, tokenizer, cfg).

chat.py, eval_mmbench.py and convert.py all load through `load_model`, and train.py builds and saves through
`build_model` / `save_model`, so a folder that one of them reads, all of them read. The layouts:

    our run's model/          llava.json + projector.safetensors + llm_adapter/ | llm/ + vision_adapter/
    an export of convert.py   the layout below, plus llava.json {"layout": ...} naming what the layout cannot hold:
                              base folders, chat template, select layer, image mode, and whether the LLM was NF4
    HF LLaVA                  transformers' LlavaForConditionalGeneration folder (config.json model_type "llava")
    XTuner                    projector/ [+ llm_adapter/ + visual_encoder_adapter/ + LLM at the root + visual_encoder/],
                              its projector folder alone, or iter_N.pth (a file or DeepSpeed's folder of that name)
    official LLaVA            haotian-liu/LLaVA's llava_llama folder (tower inside, or named by mm_vision_tower)
    PEFT adapter              adapter_config.json + adapter_model.*: an LLM adapter on a base LLM (text-only model)
    plain LLM                 an HF Llama or InternLM2 folder (a text-only model, e.g. `convert.py --to llm`)

`cfg` (the run's llava.json, or what a layout tells) names the chat template, image size and mode, select layer,
the LLM mode (frozen | frozen-nf4 | full | lora | qlora) and the LoRA settings. What a layout does not hold comes
from `--llm` / `--vision` / `--template` (add_model_arguments); a folder that names a template refuses another one.
An adapter trained on an NF4 base is applied to an NF4 base again (the model it was trained as), unless
`bf16_base=True` asks for the full-precision base.
"""

import argparse
import shutil
from pathlib import Path

import torch

import clip
import data
import llama
import lora
from extras import internlm2, xtuner
from model import LLM_LORA_TARGETS, LLaVA, Projector
from extras.tokenizer_files import load_tokenizer
from weights import CheckpointReader, hf_name_mapper, load_with_table, read_json, save_safetensors, write_json

LLM_MODEL_TYPES = ("llama", "internlm2")  # config.json model_type of the LLM folders load_llm reads
PROJECTOR_KEYS = {f"linear_{i}.{p}": f"linear_{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}  # ours as is


class LoadError(ValueError):
    """A model folder that cannot be loaded as given; the message says what to pass or fix (one line)."""


def _model_type(path):
    path = Path(path)
    return read_json(path / "config.json").get("model_type") if (path / "config.json").is_file() else None


# ----------------------------------------------------------------------------------------------------------------
# The LLM alone, in its own family's layout


def load_llm(path, dtype=torch.bfloat16, device="cpu"):
    """An HF Llama or InternLM2 folder -> llama.Llama (InternLM2 is the same decoder under other names)."""
    if _model_type(path) == "internlm2":
        return internlm2.load_internlm2(path, dtype, device)
    return llama.load_llama(path, dtype, device)


def save_llm(llm, folder, dtype=torch.bfloat16, max_shard_bytes=5_000_000_000):
    """Write the LLM back in the layout it was read from."""
    if llm.cfg.layout == "internlm2":
        return internlm2.save_internlm2(llm, folder, dtype, max_shard_bytes)
    return llama.save_llama(llm, folder, dtype, max_shard_bytes)


# ----------------------------------------------------------------------------------------------------------------
# Our run folder: model/ = llava.json + projector.safetensors + adapters or a full LLM


def base_path(name, folder):
    """A base-model path from llava.json. Runs write absolute paths; an older run's relative path is tried from the
    working directory, then from each folder above the run (it was relative to where training was started)."""
    if name is None or Path(name).is_absolute() or Path(name).exists():
        return name
    for above in Path(folder).resolve().parents:
        if (above / name).exists():
            return str(above / name)
    return name


def build_model(cfg, dtype=torch.bfloat16, device="cpu", llm_path=None):
    """Base CLIP + base (or finetuned) LLM + a fresh projector, as llava.json describes them (no adapters yet);
    the LLM alone when cfg["vision"] is None (a text-only run)."""
    llm = load_llm(llm_path or cfg["llm"], dtype=dtype, device=device)
    if cfg.get("vision") is None:
        return LLaVA(None, None, llm)
    vision = clip.load_clip(cfg["vision"], dtype=dtype, device=device)
    p = cfg["projector"]
    projector = Projector(p["in"], p["out"], p["hidden"]).to(device=device, dtype=dtype)
    return LLaVA(vision, projector, llm, cfg.get("select_layer", -2))


def copy_tokenizer(src, dst):
    src, dst = Path(src), Path(dst)
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                 "generation_config.json", "original/tokenizer.model"]:
        if (src / name).exists():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / name, dst / name)


def save_model(model, folder, cfg):
    """Write the trainable part of `model` and llava.json, which names everything else: the base LLM and vision
    folders (as absolute paths), template, select layer, image mode and size, projector sizes, the LLM mode with
    its LoRA settings, and the vision LoRA."""
    if model.llm.fused:
        raise ValueError("save_model: the LLM's projections were fused for inference (fuse_projections); "
                         "save the model before fusing it")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**cfg, **{k: str(Path(cfg[k]).resolve()) for k in ("llm", "vision")
                     if cfg.get(k) and Path(cfg[k]).exists()}}
    if model.projector is not None:  # a text-only model (cfg "vision": None) has none
        save_safetensors(model.projector.state_dict(), folder, basename="projector")
    if cfg.get("llm_lora"):
        c = cfg["llm_lora"]
        lora.save_adapter(model.llm, folder / "llm_adapter", hf_name_mapper(llama.HF_KEYS)[0], c["r"],
                          c["alpha"], c["dropout"], c["targets"], task_type="CAUSAL_LM", base_model=cfg["llm"])
    if cfg.get("llm_mode") == "full":
        save_llm(model.llm, folder / "llm", dtype=getattr(torch, cfg.get("dtype", "bfloat16")))
        copy_tokenizer(cfg["llm"], folder / "llm")
    if cfg.get("vision_lora"):
        c = cfg["vision_lora"]
        lora.save_adapter(model.vision, folder / "vision_adapter", hf_name_mapper(clip.HF_KEYS)[0], c["r"],
                          c["alpha"], c["dropout"], c["targets"], base_model=cfg["vision"])
    write_json(folder / "llava.json", cfg)


def read_projector(path):
    """The projector weights (our names) of a previous stage, to start the next from: our run (its folder, its
    model/, or runs/latest), XTuner's folder or projector/ folder, or XTuner's iter_N.pth (file or DeepSpeed folder)."""
    path = Path(path).resolve()  # runs/latest is a symlink to a model/ folder
    for folder in (path, path / "model"):
        if (folder / "llava.json").is_file() and (folder / "projector.safetensors").is_file():
            return dict(CheckpointReader(folder / "projector.safetensors").items())
    return xtuner.read_projector(path)


def _load_run(folder, dtype, device, bf16_base):
    cfg = read_json(folder / "llava.json")
    cfg = {**cfg, "llm": base_path(cfg.get("llm"), folder), "vision": base_path(cfg.get("vision"), folder)}
    full = cfg.get("llm_mode") == "full"
    model = build_model(cfg, dtype, device, llm_path=folder / "llm" if full else None)
    if model.projector is not None:
        load_with_table(model.projector, CheckpointReader(folder / "projector.safetensors"), PROJECTOR_KEYS, dtype)
    nf4 = cfg.get("llm_mode") in ("qlora", "frozen-nf4") and not bf16_base
    if cfg.get("llm_lora"):
        c = cfg["llm_lora"]
        lora.inject_lora(model.llm, c["targets"], c["r"], c["alpha"], 0.0, nf4=nf4)
        lora.load_adapter(model.llm, folder / "llm_adapter", hf_name_mapper(llama.HF_KEYS)[0])
    elif nf4:
        lora.quantize_nf4(model.llm, LLM_LORA_TARGETS)
    if cfg.get("vision_lora"):
        c = cfg["vision_lora"]
        lora.inject_lora(model.vision, c["targets"], c["r"], c["alpha"], 0.0)
        lora.load_adapter(model.vision, folder / "vision_adapter", hf_name_mapper(clip.HF_KEYS)[0])
    model.to(device).eval()
    return model, load_tokenizer(folder / "llm" if full else cfg["llm"]), cfg


def latest_model_dir(runs="runs"):
    """runs/latest, which train.py points at the newest model/; else the newest `latest` link one level down
    (a run whose --out was runs/NAME/STAGE links runs/NAME/latest)."""
    link = Path(runs) / "latest"
    if not link.exists():
        links = sorted((p for p in Path(runs).glob("*/latest") if p.exists()), key=lambda p: p.lstat().st_mtime)
        if not links:
            raise LoadError(f"no trained model found at {link}. Train one first (e.g. `make demo`, or `python "
                            "train.py @recipes/...`), or pass --model DIR (a run's model/ folder or any export)")
        link = links[-1]
    return link.resolve()


def model_path(path=None):
    """The model folder `--model` names; left out (or runs/latest when there is no such link) it is the newest
    trained model (`latest_model_dir`)."""
    if path is None or (Path(path) == Path("runs/latest") and not Path(path).exists()):
        return latest_model_dir()
    if not Path(path).exists():
        raise LoadError(f"no model at {path}: train one first (train.py links runs/latest to its model/ folder), "
                        "or pass --model DIR (a run's model/ folder or any export)")
    return Path(path)


# ----------------------------------------------------------------------------------------------------------------
# The HF transformers LlavaForConditionalGeneration folder


def hf_llava_keys(new_layout=False, vision_table=clip.HF_KEYS):
    """Key table of an HF LLaVA folder. `save_pretrained` writes the pre-4.52 layout (`language_model.model.*`,
    `vision_tower.*`); transformers >= 4.52 holds `model.language_model.*` in memory and some repos store that.
    Inside the tower, checkpoints written by transformers < 5.23 say `vision_model.*`, newer ones drop that level
    (`vision_table=clip.HF_KEYS_UNPREFIXED`); we write the older spelling, which every version reads."""
    if new_layout:
        text = {("model.language_model." + k[len("model."):] if k.startswith("model.") else k): v
                for k, v in llama.HF_KEYS.items()}
        vis, proj = "model.vision_tower.", "model.multi_modal_projector."
    else:
        text = {"language_model." + k: v for k, v in llama.HF_KEYS.items()}
        vis, proj = "vision_tower.", "multi_modal_projector."
    table = {k: (None if v is None else "llm." + v) for k, v in text.items()}
    table.update({vis + k: (None if v is None else "vision." + v) for k, v in vision_table.items()})
    table.update({f"{proj}{k}": "projector." + v for k, v in PROJECTOR_KEYS.items()})
    return table


def load_hf_llava(folder, dtype=torch.bfloat16, device="cpu"):
    """The weights of an HF `LlavaForConditionalGeneration` folder -> (our LLaVA, its card); no tokenizer."""
    folder = Path(folder)
    hf = read_json(folder / "config.json")
    vcfg = clip.CLIPConfig.from_hf_config(hf["vision_config"])
    tcfg = llama.LlamaConfig.from_hf_config(hf["text_config"])
    select = hf.get("vision_feature_layer", -2)
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise LoadError(f"{folder}: vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} is not "
                        "supported (LLaVA-1.5 drops CLS: 'default')")
    with torch.device("meta"):
        model = LLaVA(clip.CLIPVisionTower(vcfg), Projector(vcfg.hidden_size, tcfg.hidden_size),
                      llama.Llama(tcfg), select)
    reader = CheckpointReader(folder)
    keys = reader.keys()
    new = any(k.startswith("model.language_model.") for k in keys)
    vis = "model.vision_tower." if new else "vision_tower."
    table = hf_llava_keys(new, clip.table_for([k[len(vis):] for k in keys if k.startswith(vis)]))
    if tcfg.tie_word_embeddings:  # one shared matrix, stored as the embedding (as llama.load_llama does)
        del model.llm.lm_head.weight
        table = {k: (None if v == "llm.lm_head.weight" else v) for k, v in table.items()}
    load_with_table(model, reader, table, dtype=dtype, device=device)
    if tcfg.tie_word_embeddings:
        model.llm.lm_head.weight = model.llm.embed_tokens.weight
    model.llm.init_rope(device)
    cfg = {"layout": "hf", "select_layer": select, "image_mode": "pad", "image_size": vcfg.image_size,
           "image_tokens": vcfg.num_patches, "image_token_index": hf.get("image_token_index"),
           "llm_mode": "full", "vision_mode": "full"}
    return model.eval(), cfg


def _load_hf(folder, dtype, device):
    model, cfg = load_hf_llava(folder, dtype, device)
    return model, load_tokenizer(folder), cfg


# ----------------------------------------------------------------------------------------------------------------
# XTuner's folder and checkpoints, haotian-liu/LLaVA's folder


def _need(value, flag, where):
    if not value:
        raise LoadError(f"{where} does not contain the base {flag[2:].upper()}: pass {flag} PATH (an HF folder)")
    if not (Path(value) / "config.json").is_file():
        raise LoadError(f"{flag} {value}: no config.json there (give an HF model folder)")
    return value


def add_adapter(part, sd, table, alpha, dropout, nf4=False):
    """Give `part` the LoRA adapter held in `sd` (PEFT keys, XTuner's `.default` allowed): targets and rank are read
    off the keys, so the file decides, not a guess."""
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in sd})
    r = next(v.shape[0] for k, v in sd.items() if ".lora_A." in k)
    lora.inject_lora(part, targets, r, alpha, 0.0, nf4=nf4)
    lora.load_adapter(part, sd, hf_name_mapper(table)[0], config={"r": r, "lora_alpha": alpha})
    return {"r": r, "alpha": alpha, "dropout": dropout, "targets": targets}


def _merge_internlm2(llm, adapter, alpha, nf4):
    """An InternLM2 adapter (on the packed wqkv) merged into the weights; on an NF4-trained base, into the weights
    the NF4 base computes with (quantized, then dequantized), so the merged model is the model as trained."""
    if nf4:
        lora.quantize_nf4(llm, LLM_LORA_TARGETS)
        lora.merge_lora(llm)
    internlm2.merge_internlm2_adapter(llm, adapter, config={"lora_alpha": alpha})


def _vision_table(keys):
    """CLIP key table for either spelling (`vision_model.encoder...` or transformers 5's `encoder...`)."""
    return clip.HF_KEYS if any("vision_model." in k for k in keys) else clip.HF_KEYS_UNPREFIXED


def _load_xtuner(path, dtype, device, llm, vision, meta, lora_alpha, vision_lora_alpha, nf4):
    """XTuner's export folder, its projector folder alone, or its iter_N.pth. LoRA alpha is not in a .pth: XTuner's
    Llama-3 recipes use 16, its InternLM2 ones 256 (lora_alpha=None picks by the LLM). An InternLM2 LLM's adapter
    sits on the packed `wqkv`, which our separate q/k/v cannot hold: it is merged into the weights at load (the
    model then holds a full LLM). A .pth without `projector.*` is a text-only run (XTuner's LLM SFT)."""
    folder = path.is_dir() and ((path / "projector").is_dir() or xtuner.is_projector_folder(path))
    sd = {} if folder else xtuner.read_xtuner_pth(path)
    text_only = not folder and not any(k.startswith("projector.") for k in sd)
    root_llm = folder and (path / "projector").is_dir() and (path / "config.json").exists()  # a fully trained LLM
    own_tower = folder and (path / "visual_encoder").is_dir()  # a fully trained vision tower
    llm_path = str(path) if root_llm else _need(llm or meta.get("llm"), "--llm", path)
    tcfg = llama.LlamaConfig.from_hf_config(read_json(Path(llm_path) / "config.json"))
    cfg = {"llm": llm_path, "vision": None, "llm_mode": "full" if root_llm else "frozen", "llm_lora": None,
           "vision_lora": None, "image_tokens": 0}
    if text_only:
        model = LLaVA(None, None, load_llm(llm_path, dtype, device))
    else:
        vision_path = str(path / "visual_encoder") if own_tower else _need(vision or meta.get("vision"), "--vision",
                                                                            path)
        vcfg = clip.CLIPConfig.from_hf_config(read_json(Path(vision_path) / "config.json"))
        cfg.update({"vision": vision_path, "select_layer": meta.get("select_layer", -2),
                    "image_mode": meta.get("image_mode", "pad"), "image_size": vcfg.image_size,
                    "image_tokens": vcfg.num_patches,
                    "projector": {"in": vcfg.hidden_size, "hidden": tcfg.hidden_size, "out": tcfg.hidden_size},
                    "vision_mode": "full" if own_tower else "frozen"})
        model = LLaVA(clip.load_clip(vision_path, dtype, device), Projector(vcfg.hidden_size, tcfg.hidden_size),
                      load_llm(llm_path, dtype, device), cfg["select_layer"])
        load_with_table(model.projector, xtuner.read_projector(path, None if folder else sd), PROJECTOR_KEYS,
                        dtype, device)
    is_internlm2 = tcfg.layout == "internlm2"
    if lora_alpha is None:
        lora_alpha = 256 if is_internlm2 else 16  # XTuner's recipes: InternLM2 QLoRA r 512 / alpha 256; Llama-3 16
    for prefix, sub, part, key, alpha in (("llm.", "llm_adapter", model.llm, "llm", lora_alpha),
                                          ("visual_encoder.", "visual_encoder_adapter", model.vision, "vision",
                                           vision_lora_alpha)):
        own = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        dropout = 0.05  # XTuner's recipes; only written back into adapter_config.json
        if folder and (path / sub).is_dir():
            own, conf = lora.read_adapter(path / sub, None)
            alpha, dropout = conf["lora_alpha"], conf.get("lora_dropout", 0.0)
        table = llama.HF_KEYS if key == "llm" else _vision_table(own)
        plain = [k for k in own if ".lora_" not in k]
        if plain and len(plain) < len(own):
            raise LoadError(f"{path}: `{prefix}*` mixes LoRA and plain weights (e.g. {plain[:3]}); an XTuner "
                            "checkpoint holds an adapter or a fully trained part, not both")
        if plain:  # a fully trained part: XTuner saves every one of its weights
            if key == "llm" and is_internlm2:  # InternLM2's names and packed wqkv
                load_with_table(part, internlm2.InternLM2Reader(own, tcfg), internlm2.INTERNLM2_KEYS, dtype, device)
            else:
                load_with_table(part, own, table, dtype, device)
            cfg[f"{key}_mode"] = "full"
        elif own and key == "llm" and is_internlm2:
            _merge_internlm2(part, own, alpha, nf4)
            cfg["llm_mode"] = "full"
        elif own:
            quantized = key == "llm" and nf4
            cfg[f"{key}_lora"] = add_adapter(part, own, table, alpha, dropout, nf4=quantized)
            if key == "llm":
                cfg["llm_mode"] = "qlora" if quantized else "lora"
    return model.to(device).eval(), load_tokenizer(llm_path), cfg


def _load_official(path, dtype, device, vision):
    """haotian-liu/LLaVA's folder. The tower is in it when it was trained (XTuner's export puts it there whenever
    it had LoRA or was unfrozen); otherwise `mm_vision_tower` (or --vision) must name a local CLIP folder."""
    hf = read_json(path / "config.json")
    tcfg = llama.LlamaConfig.from_hf_config(hf)
    reader = CheckpointReader(path)
    has_tower = any(k.startswith("model.vision_tower.vision_tower.") for k in reader.keys())
    vision_path = None
    if has_tower:  # official folders hold no CLIP config (ours adds one); the released ones all use ViT-L/14-336,
        # and another tower fails the strict load below with its keys named
        vcfg = clip.CLIPConfig.from_hf_config(read_json(path / "vision_config.json")) \
            if (path / "vision_config.json").exists() else clip.CLIPConfig.from_name("clip-vit-l-14-336")
    else:
        vision_path = vision or hf.get("mm_vision_tower", "")
        if not (Path(vision_path) / "config.json").exists():
            raise LoadError(f"{path}: the vision tower is not in the folder and mm_vision_tower="
                            f"{hf.get('mm_vision_tower')!r} is not a local folder (we never download): pass --vision")
        vcfg = clip.CLIPConfig.from_hf_config(read_json(Path(vision_path) / "config.json"))
    with torch.device("meta"):
        model = LLaVA(clip.CLIPVisionTower(vcfg), Projector(hf.get("mm_hidden_size", vcfg.hidden_size),
                                                            tcfg.hidden_size), llama.Llama(tcfg),
                      hf.get("mm_vision_select_layer", -2))
    if has_tower:
        load_with_table(model, reader, xtuner.OFFICIAL_KEYS, dtype=dtype, device=device)
    else:  # the same strict load over the two parts that are in the file; the tower comes from its own folder
        model.vision = clip.load_clip(vision_path, dtype=dtype, device=device)
        table = {k: v for k, v in xtuner.OFFICIAL_KEYS.items() if not k.startswith("model.vision_tower.")}
        load_with_table(torch.nn.ModuleDict({"llm": model.llm, "projector": model.projector}), reader, table, dtype,
                        device)
    model.llm.init_rope(device)
    cfg = {"layout": "official", "select_layer": model.select_layer,
           "image_mode": "pad" if hf.get("image_aspect_ratio", "pad") == "pad" else "crop",
           "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches, "vision": vision_path,
           "tokenizer": str(path), "llm_mode": "full", "vision_mode": "full" if has_tower else "frozen"}
    return model.eval(), load_tokenizer(path), cfg


# ----------------------------------------------------------------------------------------------------------------
# Text-only models: a plain LLM folder, or a PEFT adapter on one


def _load_text(folder, dtype, device):
    cfg = {"llm": str(folder), "vision": None, "llm_mode": "full", "llm_lora": None, "vision_lora": None,
           "image_tokens": 0}
    return LLaVA(None, None, load_llm(folder, dtype, device)).eval(), load_tokenizer(folder), cfg


def _load_peft(folder, dtype, device, llm, meta, nf4):
    conf = read_json(folder / "adapter_config.json")
    base = llm or meta.get("llm") or conf.get("base_model_name_or_path")
    base = _need(base if base and Path(base).is_dir() else None, "--llm", folder)
    model = LLaVA(None, None, load_llm(base, dtype, device))
    sd, _ = lora.read_adapter(folder, conf)
    if _model_type(base) == "internlm2":
        _merge_internlm2(model.llm, sd, conf["lora_alpha"], nf4)
        mode, c = "full", None
    else:
        c = add_adapter(model.llm, sd, llama.HF_KEYS, conf["lora_alpha"], conf.get("lora_dropout", 0.0), nf4=nf4)
        mode = "qlora" if nf4 else "lora"
    cfg = {"llm": base, "vision": None, "llm_mode": mode, "llm_lora": c, "vision_lora": None, "image_tokens": 0}
    return model.to(device).eval(), load_tokenizer(base), cfg


# ----------------------------------------------------------------------------------------------------------------
# The entry point


def _template(cfg, tok, given, where, text_only):
    """The chat template: the folder's own (another one is refused: the model stops where it learnt to), else the
    one given, else the one the tokenizer's chat tokens imply for a LLaVA layout. A plain LLM names none and its
    tokenizer does not say which it was finetuned with, so there it must be given."""
    own = cfg.get("template")
    if own and given and given != own:
        raise LoadError(f"--template {given}: {where} was trained with {own} (another template would not stop where "
                        "the model learnt to); leave --template out")
    choice = own or given
    if choice is None and not text_only:
        specials = getattr(tok, "special_tokens", {})
        choice = next((name for name, token in (("llama3_chat", "<|eot_id|>"), ("internlm2_chat", "<|im_end|>"))
                       if token in specials), None)
    if choice is None:
        raise LoadError(f"{where} does not say its chat template: pass --template ({' | '.join(sorted(data.TEMPLATES))}"
                        "; Llama-3-Instruct: llama3_chat, InternLM2-Chat: internlm2_chat)")
    data.get_template(choice)
    return choice


def load_model(path=None, dtype=torch.bfloat16, device="cpu", llm=None, vision=None, template=None,
               bf16_base=False, lora_alpha=None, vision_lora_alpha=16):
    """Any supported layout -> (LLaVA, tokenizer, cfg); `path` defaults to runs/latest. llm / vision name base
    models where the layout holds only what was trained; template, where it names none. lora_alpha: of an XTuner
    .pth's LLM adapter (not stored in it; None = XTuner's recipes' value). Raises LoadError with what to pass."""
    path = model_path(path)
    if (path / "model" / "llava.json").exists():  # a run folder was given instead of its model/
        path = path / "model"
    meta = read_json(path / "llava.json") if (path / "llava.json").is_file() else {}
    layout = meta.get("layout", "run") if meta else None
    meta = {**meta, "llm": base_path(meta.get("llm"), path), "vision": base_path(meta.get("vision"), path)}
    kind = _model_type(path)
    nf4 = meta.get("llm_mode") == "qlora" and not bf16_base
    if layout == "run":
        model, tok, cfg = _load_run(path, dtype, device, bf16_base)
    elif kind == "llava":
        model, tok, cfg = _load_hf(path, dtype, device)
    elif kind == "llava_llama":
        model, tok, cfg = _load_official(path, dtype, device, vision or meta.get("vision"))
    elif xtuner.is_xtuner(path):
        model, tok, cfg = _load_xtuner(path, dtype, device, llm, vision, meta, lora_alpha, vision_lora_alpha, nf4)
    elif (path / "adapter_config.json").is_file():
        model, tok, cfg = _load_peft(path, dtype, device, llm, meta, nf4)
    elif (path / "vision_adapter").is_dir() or (path / "llm_adapter").is_dir() and not (path / "projector").is_dir():
        if (path / "vision_adapter").is_dir() or meta.get("vision"):
            raise LoadError(f"{path} holds LoRA adapters only, not a LLaVA (no projector): convert the model --to "
                            "xtuner to load it elsewhere")
        model, tok, cfg = _load_peft(path / "llm_adapter", dtype, device, llm, meta, nf4)  # a text-only run's
    elif kind in LLM_MODEL_TYPES:
        model, tok, cfg = _load_text(path, dtype, device)
    elif (path / "trainer_state.json").exists() or (path / "checkpoints").is_dir():
        raise LoadError(f"{path} is a train.py checkpoint: `python train.py export {path}` writes its model/ folder")
    else:
        raise LoadError(f"{path}: not a model folder this project reads (a run's model/ with llava.json, an HF LLaVA "
                        "folder, an XTuner folder with projector/ or iter_N.pth, an official llava_llama folder, a "
                        "PEFT adapter folder, or a plain Llama / InternLM2 folder)")
    for key in ("template", "select_layer", "image_mode"):  # what an export's llava.json adds to its layout
        if key in meta and key not in cfg:
            cfg[key] = meta[key]
    cfg["template"] = _template(cfg, tok, template, path, model.vision is None)
    return model, tok, cfg


def count(text):
    """argparse type of a flag that counts something (a batch, new tokens): a whole number of at least 1."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n


def add_model_arguments(parser):
    """The model flags chat.py, eval_mmbench.py and convert.py share."""
    g = parser.add_argument_group("model (any layout: run folder, HF LLaVA, XTuner, official LLaVA, PEFT, plain LLM)")
    g.add_argument("--model", default=None, help="model folder or XTuner iter_N.pth (default: runs/latest)")
    g.add_argument("--llm", default=None, help="base LLM folder, for layouts that hold only what was trained")
    g.add_argument("--vision", default=None, help="base CLIP folder, likewise")
    g.add_argument("--template", default=None, choices=sorted(data.TEMPLATES),
                   help="chat template, for layouts that name none (a folder that names one refuses another)")
    g.add_argument("--bf16-base", action="store_true",
                   help="apply an adapter trained on an NF4 base (QLoRA) to the full-precision base instead")
    g.add_argument("--lora-alpha", type=float, default=None,
                   help="LLM LoRA alpha of an XTuner iter_N.pth (not stored in it; default: XTuner's recipes' 16, "
                        "or 256 for an InternLM2 LLM)")
    return parser


def load_from_args(args, dtype=torch.bfloat16, device="cpu"):
    return load_model(args.model, dtype, device, llm=args.llm, vision=args.vision, template=args.template,
                      bf16_base=args.bf16_base, lora_alpha=args.lora_alpha)


if __name__ == "__main__":
    p = add_model_arguments(argparse.ArgumentParser(description="Load a model folder and print what it holds."))
    m, t, c = load_from_args(p.parse_args(), torch.float32)
    print(c)
