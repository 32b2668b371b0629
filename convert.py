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

Sources: whatever extras/loader.py reads, and train.py checkpoints (`checkpoints/step_N`, exported to a run folder
first). Output is safetensors (bf16, or `--fp32`), sharded past `--max-shard-size`, with a `llava.json` naming what
the layout cannot hold (template, base folders, select layer, an NF4 base), so that chat.py, eval_mmbench.py and
convert.py read the export back with no further flag. A QLoRA model stays on its NF4 base in the layouts that keep
adapters (xtuner, adapters); the merged ones (hf, official, llm) hold the dequantized base plus the adapter, which is
what the NF4 model computes. `--verify` reloads the export and compares its logits with the model it must equal.

Every layout is a key table: HF's in extras/loader.py, Llama's in llama.py, CLIP's in clip.py, XTuner's and the
official one in extras/xtuner.py. CLIP keys have two spellings: `vision_model.encoder...` (hub checkpoints,
transformers 4.x, XTuner), which every weights file here uses, and `encoder...` (transformers >= 5), which the PEFT
adapter of `--to adapters` uses because PEFT matches keys against the installed module tree. Both are read.
"""

import argparse
import shutil
import sys
from pathlib import Path

import torch
from PIL import Image

import clip
import data
import lora
import llama
from extras import internlm2, loader
from extras.checkpoint import export_checkpoint
from extras.hf_export import write_hf_chat_files
from extras.hf_tokenizer import write_hf_tokenizer
from extras.xtuner import OFFICIAL_KEYS, XTUNER_PROJECTOR_KEYS
from tokenizer import TiktokenTokenizer
from weights import hf_name_mapper, invert_table, rename_state_dict, save_safetensors, write_json

CLIP_PREPROCESSOR = {  # openai/clip-vit-large-patch14-336's preprocessor_config.json (the size is the tower's)
    "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "image_mean": list(clip.CLIP_MEAN), "image_std": list(clip.CLIP_STD), "image_processor_type": "CLIPImageProcessor",
    "resample": 3, "rescale_factor": 1 / 255}


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


def _write_preprocessor(folder, size, pad=False):
    """pad: LLaVA's image_mode "pad" (expand2square with the mean colour first), which LlavaImageProcessor does."""
    write_json(Path(folder) / "preprocessor_config.json", CLIP_PREPROCESSOR | {
        "crop_size": {"height": size, "width": size}, "size": {"shortest_edge": size}}
        | ({"image_processor_type": "LlavaImageProcessor", "do_pad": True} if pad else {}))


def _write_tokenizer(tok, cfg, out):
    """The source's own tokenizer files when we know them (they keep its chat template), and a tokenizer.json
    written from ours when they hold none (transformers' AutoTokenizer needs one)."""
    src = cfg.get("tokenizer") or cfg.get("llm")
    if src and Path(src).is_dir() and Path(src).resolve() != Path(out).resolve():
        loader.copy_tokenizer(src, out)
    if not (Path(out) / "tokenizer.json").exists() and isinstance(tok, TiktokenTokenizer):
        write_hf_tokenizer(tok, out)


def write_hf(model, tok, cfg, out, dtype, shard):
    """transformers' LlavaForConditionalGeneration folder, as `save_pretrained` writes it (pre-4.52 key layout, which
    every transformers version loads), with `<image>` and `<pad>` added to the tokenizer and the vocabulary padded
    to a multiple of 64 as xtuner/llava-llama-3-8b-v1_1-transformers has it (128257, 128258, 128320 for Llama-3)."""
    if model.llm.cfg.layout != "llama" or not isinstance(tok, TiktokenTokenizer):
        raise ConvertError(f"--to hf: transformers' LlavaForConditionalGeneration folder written here holds a Llama-3 "
                           f"LLM (tiktoken tokenizer); this model's LLM is {model.llm.cfg.layout} with a "
                           f"{type(tok).__name__}. Use --to xtuner (XTuner's layout) or --to official instead")
    sd = rename_state_dict(_full_state(model), invert_table(loader.hf_llava_keys()))
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
    _write_preprocessor(out, vc.image_size, pad=cfg.get("image_mode", "pad") == "pad")
    write_hf_chat_files(out, tok, cfg["template"], vc.patch_size, pad_id)  # AutoProcessor's prompt, generate's stops


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
    """PEFT folders of the LoRA adapters as trained (not merged); False when the model has none. An InternLM2 LLM's
    adapter is written on InternLM2's own modules (wqkv, wo, w1, w2, w3), as XTuner writes it."""
    wrote = False
    for part, table, key, name, task in ((model.llm, llama.HF_KEYS, "llm", llm_name, "CAUSAL_LM"),
                                         (model.vision, vision_table, "vision", vision_name, None)):
        c = cfg.get(f"{key}_lora")
        if c and key == "llm" and part.cfg.layout == "internlm2":
            tensors, r, alpha = internlm2.to_internlm2_adapter(part, c["r"], c["alpha"])
            targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[1] for k in tensors})
            lora.write_adapter(Path(out) / name, tensors, r, alpha, c["dropout"], targets, task, cfg.get(key))
            wrote = True
        elif c:
            lora.save_adapter(part, Path(out) / name, hf_name_mapper(table)[0], c["r"], c["alpha"],
                              c["dropout"], c["targets"], task_type=task, base_model=cfg.get(key))
            wrote = True
    return wrote


def write_llm(model, tok, cfg, out, dtype, shard):
    """The LLM alone, LoRA merged and NF4 dequantized, in its base's own layout: an HF LlamaForCausalLM folder, or an
    InternLM2ForCausalLM one (loader.save_llm keeps the layout it read) with the base's remote-code `*.py` files,
    which transformers runs it with (trust_remote_code) and its config.json's auto_map names."""
    lora.merge_lora(model.llm)
    loader.save_llm(model.llm, out, dtype=dtype, max_shard_bytes=shard)
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


def write_card(out, layout, cfg, merged):
    """llava.json beside an export: what its layout cannot hold, for extras/loader.py to read it back as trained.
    A merged export holds every weight (llm_mode "full"); one that keeps adapters names the bases they go on,
    and whether the LLM's base was NF4 (QLoRA), so the adapter is applied to the base it was trained on."""
    card = {"layout": layout, "template": cfg["template"]}
    if not merged:
        card.update({k: str(Path(cfg[k]).resolve()) for k in ("llm", "vision") if cfg.get(k)})
        card["llm_mode"] = cfg.get("llm_mode")
    card.update({k: cfg[k] for k in ("select_layer", "image_mode") if k in cfg})
    write_json(Path(out) / "llava.json", card)


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


class ConvertError(ValueError):
    """A conversion that cannot be done as asked; the message says why and what works instead."""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", nargs="?", default=None, help="the model to convert (same as --model; default runs/latest)")
    p.add_argument("--to", required=True, choices=[*WRITERS, "adapters"])
    p.add_argument("--out", required=True)
    p.add_argument("--fp32", action="store_true", help="write fp32 (default bf16)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 2GB, 500MB")
    p.add_argument("--verify", action="store_true", help="reload the export and compare logits with the source")
    loader.add_model_arguments(p)
    args = p.parse_args(argv)
    args.model = args.src or args.model
    try:
        return convert(args)
    except (loader.LoadError, ConvertError) as e:
        print(f"convert.py: {e}", file=sys.stderr)
        return 2


def convert(args):
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not empty: choose a new --out")
    src = loader.model_path(args.model)  # runs/latest by default, as chat.py and eval_mmbench.py
    args.model = str(src)
    if (src / "trainer_state.json").exists() or (src / "checkpoints").is_dir():
        args.model = str(export_checkpoint(src))  # a train.py checkpoint: its model/ folder first
    dtype = torch.float32 if args.fp32 else torch.bfloat16
    model, tok, cfg = loader.load_from_args(args, dtype=torch.float32)
    if model.vision is None and args.to not in ("llm", "adapters"):
        raise ConvertError(f"{src} is a text-only model (no vision tower, no projector): convert it --to llm (a plain "
                           "LLM folder, adapters merged) or --to adapters")
    text_only = args.to == "llm" or model.vision is None  # the export is the LLM alone: compare it on text
    check = args.verify and (args.to in ("hf", "official", "xtuner", "llm") or model.vision is None)
    reference = probe_logits(model, tok, cfg, text_only) if check else None  # before the writers merge in place
    nf4 = cfg.get("llm_mode") in ("qlora", "frozen-nf4")
    if args.to == "adapters":
        if not write_adapters(model, cfg, out):
            raise ConvertError(f"{src} has no LoRA adapters to write")
    else:
        WRITERS[args.to](model, tok, cfg, out, dtype, _parse_size(args.max_shard_size))
    if args.to != "clip":
        write_card(out, args.to, cfg, merged=args.to in ("hf", "official", "llm"))
    print(f"wrote the {args.to} layout to {out}")
    if args.verify and not check:
        print(f"--verify compares whole models; it does not apply to --to {args.to}")
    if check:
        back, tok2, _ = loader.load_model(out, dtype=torch.float32, llm=args.llm, vision=args.vision,
                                          template=cfg["template"], lora_alpha=args.lora_alpha)
        kept = args.to in ("xtuner", "adapters") and nf4
        print("verify: " + ("the export on its NF4 base, against the trained model on its NF4 base" if kept else
                            "the merged export (NF4 base dequantized), against the trained model on its NF4 base"
                            if nf4 else "the export against the source model"))
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
