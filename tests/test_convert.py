"""convert.py against the loaders of each layout: transformers (LLaVA, Llama, CLIP, AutoTokenizer), peft, the key
names XTuner and haotian-liu/LLaVA write (reference §5, spelled out literally below), bitsandbytes' own NF4
dequantization, and pickles that must never run.

One tiny base model pair is written once per module with our own save functions: a CLIP tower (32 px, patch 8:
16 image positions) and a Llama with the real Llama-3 vocabulary (128,256 ids) and tokenizer, so the HF export's
`<image>` = 128257, `<pad>` = 128258 and vocabulary 128,320 are the published ones. Run folders on top of it are
written with extras.loader.save_model, as train.py writes them.
"""

import shutil
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import clip
import convert
import data
import llama
import lora
import model as M
from extras.tokenizer_files import load_tokenizer
from extras.hf_tokenizer import write_hf_tokenizer
import weights
from weights import read_json
from extras import loader

VOCAB = 128_256
IMAGE_ID, PAD_ID, PADDED_VOCAB = 128_257, 128_258, 128_320  # xtuner/llava-llama-3-8b-v1_1-transformers
PATCHES = 16
PROMPT = "<image>\nWhat is in this picture?"


def _randomize(module, std=0.2):
    """Move every weight away from its init (norms away from 1, adapters' B away from 0), so a dropped or swapped
    tensor changes the outputs."""
    with torch.no_grad():
        for p in module.parameters():
            if p.is_floating_point():
                p.add_(torch.randn_like(p) * std)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    import llama_models

    root = tmp_path_factory.mktemp("bases")
    torch.manual_seed(0)
    vision = clip.CLIPVisionTower(clip.CLIPConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3,
                                                  num_heads=4, intermediate_size=64))
    _randomize(vision)
    clip.save_clip(vision, root / "vision", dtype=torch.float32)
    llm = llama.Llama(llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=64))
    _randomize(llm)
    llama.save_llama(llm, root / "llm", dtype=torch.float32)
    (root / "llm" / "original").mkdir()
    shutil.copyfile(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model",
                    root / "llm" / "original" / "tokenizer.model")
    # an HF Llama-3 repo also has tokenizer.json; exports copy the base's tokenizer files
    write_hf_tokenizer(load_tokenizer(root / "llm"), root / "llm")
    return root


def make_run(bases, folder, llm_mode="lora", vision_lora=True, seed=1):
    """A run's model/ folder as train.py leaves it: llava.json + projector + adapters (random, nonzero) or full LLM."""
    lora_cfg = lambda targets: {"r": 4, "alpha": 8, "dropout": 0.05, "targets": targets}  # noqa: E731
    cfg = {"llm": str(bases / "llm"), "vision": str(bases / "vision"), "template": "llama3_chat", "select_layer": -2,
           "image_mode": "pad", "image_size": 32, "image_tokens": PATCHES,
           "projector": {"in": 32, "hidden": 32, "out": 32}, "llm_mode": llm_mode,
           "llm_lora": lora_cfg(M.LLM_LORA_TARGETS) if llm_mode in ("lora", "qlora") else None,
           "vision_lora": lora_cfg(M.VISION_LORA_TARGETS) if vision_lora else None, "dtype": "float32"}
    torch.manual_seed(seed)
    m = loader.build_model(cfg, dtype=torch.float32)
    if cfg["llm_lora"]:
        lora.inject_lora(m.llm, M.LLM_LORA_TARGETS, 4, 8, 0.05, nf4=llm_mode == "qlora")
    if vision_lora:
        lora.inject_lora(m.vision, M.VISION_LORA_TARGETS, 4, 8, 0.05)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name or name.startswith("projector.") or (llm_mode == "full" and name.startswith("llm.")):
                p.add_(torch.randn_like(p) * 0.2)
    loader.save_model(m, folder, cfg)
    return folder


@pytest.fixture(scope="module")
def lora_run(bases, tmp_path_factory):
    return make_run(bases, tmp_path_factory.mktemp("lora_run") / "model")


@pytest.fixture(scope="module")
def full_run(bases, tmp_path_factory):
    return make_run(bases, tmp_path_factory.mktemp("full_run") / "model", llm_mode="full", vision_lora=False)


def inputs(tok, hf_ids=False):
    """The probe prompt's ids (image positions as -200, or as HF's <image> id) and a random 32 px picture."""
    ids = data.encode_prompt(tok, "llama3_chat", PROMPT, image_tokens=PATCHES)
    if hf_ids:
        ids = [IMAGE_ID if i == M.IMAGE_TOKEN_INDEX else i for i in ids]
    return torch.tensor([ids]), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def tensors(folder):
    """{"file.safetensors:key": tensor} for every safetensors file under `folder` (shards and subfolders too)."""
    out = {}
    for f in sorted(Path(folder).rglob("*.safetensors")):
        with safe_open(f, framework="pt") as h:
            out.update({f"{f.relative_to(folder)}:{k}": h.get_tensor(k) for k in h.keys()})
    return out


def keys_of(file):
    with safe_open(file, framework="pt") as h:
        return set(h.keys())


def run(*argv):
    return convert.main([str(a) for a in argv])


# ----------------------------------------------------------------------------------------------------------------
# HF transformers LLaVA


def test_hf_export_loads_in_transformers_with_our_logits_tokens_and_ids(lora_run, tmp_path):
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    assert run(lora_run, "--to", "hf", "--out", tmp_path / "hf", "--fp32", "--verify") == 0
    hf, info = LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert hf.config.image_token_id == IMAGE_ID and hf.config.text_config.vocab_size == PADDED_VOCAB
    hf.eval()

    ours, tok, _ = loader.load_model(lora_run, dtype=torch.float32)
    ids, pixels = inputs(tok)
    hf_ids, _ = inputs(tok, hf_ids=True)
    with torch.no_grad():
        want = ours.logits(ids, pixels)[0]                                         # (T, 128256)
        got = hf(input_ids=hf_ids, pixel_values=pixels).logits[0]                  # (T, 128320)
    assert got.shape[-1] == PADDED_VOCAB
    torch.testing.assert_close(got[:, :VOCAB], want, rtol=1e-4, atol=1e-4)

    ours_new = M.generate(ours, ids.tolist(), pixels, max_new_tokens=6)[0]
    hf_new = hf.generate(input_ids=hf_ids, pixel_values=pixels, attention_mask=torch.ones_like(hf_ids),
                         max_new_tokens=6, do_sample=False, eos_token_id=None)[0, hf_ids.shape[1]:]
    assert hf_new.tolist() == ours_new and len(ours_new) == 6

    hf_tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "What is in this picture? Ünïcode, numbers 12345 and  spaces."
    assert hf_tok(text, add_special_tokens=False).input_ids == tok.encode(text)
    assert hf_tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [IMAGE_ID, PAD_ID]
    assert hf_tok.pad_token_id == PAD_ID
    # how transformers users build the prompt: the <image> string becomes the image id, the rest our text ids
    assert hf_tok("<image>\nHi", add_special_tokens=False).input_ids == [IMAGE_ID] + tok.encode("\nHi")


# ----------------------------------------------------------------------------------------------------------------
# PEFT adapters, merged LLM and CLIP


def test_adapters_load_in_peft_and_give_our_outputs(bases, lora_run, full_run, tmp_path):
    from peft import PeftModel
    from transformers import CLIPVisionModel, LlamaForCausalLM

    assert run(full_run, "--to", "adapters", "--out", tmp_path / "none") == 2  # no LoRA: nothing to write, said so
    assert run(lora_run, "--to", "adapters", "--out", tmp_path / "ad") == 0
    assert keys_of(tmp_path / "ad" / "llm_adapter" / "adapter_model.safetensors") >= {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"}
    # transformers 5's CLIPVisionModel has no `vision_model` level, and PEFT matches keys against the module tree
    assert "base_model.model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in \
        keys_of(tmp_path / "ad" / "vision_adapter" / "adapter_model.safetensors")
    ours, tok, _ = loader.load_model(lora_run, dtype=torch.float32)
    ids, pixels = inputs(tok)
    ids = ids.clamp(min=0)

    llm = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(bases / "llm"), tmp_path / "ad" / "llm_adapter")
    vis = PeftModel.from_pretrained(CLIPVisionModel.from_pretrained(bases / "vision"),
                                    tmp_path / "ad" / "vision_adapter")
    with torch.no_grad():
        torch.testing.assert_close(llm.eval()(input_ids=ids).logits, ours.llm.lm_head(ours.llm(ids)),
                                   rtol=1e-4, atol=1e-4)
        hidden = vis.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(hidden, ours.vision(pixels), rtol=1e-4, atol=1e-4)
    with llm.disable_adapter(), vis.disable_adapter(), torch.no_grad():  # the adapters matter: without them, no match
        assert (llm(input_ids=ids).logits - ours.llm.lm_head(ours.llm(ids))).abs().max() > 1e-3
        assert (vis(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
                - ours.vision(pixels)).abs().max() > 1e-3


def test_llm_and_clip_exports_load_in_transformers(lora_run, tmp_path):
    from transformers import CLIPVisionModel, LlamaForCausalLM

    assert run(lora_run, "--to", "llm", "--out", tmp_path / "llm", "--fp32") == 0
    assert run(lora_run, "--to", "clip", "--out", tmp_path / "clip", "--fp32") == 0
    ours, tok, _ = loader.load_model(lora_run, dtype=torch.float32)
    ids, pixels = inputs(tok)
    ids = ids.clamp(min=0)
    hf_llm, info = LlamaForCausalLM.from_pretrained(tmp_path / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf_clip, info = CLIPVisionModel.from_pretrained(tmp_path / "clip", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    with torch.no_grad():
        torch.testing.assert_close(hf_llm.eval()(input_ids=ids).logits, ours.llm.lm_head(ours.llm(ids)),
                                   rtol=1e-4, atol=1e-4)
        hidden = hf_clip.eval()(pixel_values=pixels, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(hidden, ours.vision(pixels), rtol=1e-4, atol=1e-4)


def test_qlora_merge_is_dequantized_base_plus_scaled_update(bases, tmp_path):
    import bitsandbytes.functional as bnbf

    run_dir = make_run(bases, tmp_path / "qlora" / "model", llm_mode="qlora", vision_lora=False)
    assert run(run_dir, "--to", "llm", "--out", tmp_path / "merged", "--fp32") == 0
    merged = tensors(tmp_path / "merged")
    adapter = tensors(run_dir / "llm_adapter")
    base = tensors(bases / "llm")
    for layer in range(2):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            name = f"model.layers.{layer}.{mod}"
            w = base[f"model.safetensors:{name}.weight"]
            q, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            a = adapter[f"adapter_model.safetensors:base_model.model.{name}.lora_A.weight"]
            b = adapter[f"adapter_model.safetensors:base_model.model.{name}.lora_B.weight"]
            want = bnbf.dequantize_4bit(q, state) + (8 / 4) * (b @ a)  # alpha / r = 8 / 4
            torch.testing.assert_close(merged[f"model.safetensors:{name}.weight"], want, rtol=0, atol=1e-6)
            assert (want - w).abs().max() > 1e-3  # NF4 rounding and the update are both visible


# ----------------------------------------------------------------------------------------------------------------
# XTuner and official layouts: the key names of reference §5, and bit-equal round trips


def test_xtuner_layout_names_and_round_trip(bases, lora_run, full_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(lora_run, "--to", "xtuner", "--out", a, "--fp32", "--verify") == 0
    assert keys_of(a / "projector" / "model.safetensors") == {"model.0.weight", "model.0.bias", "model.2.weight",
                                                              "model.2.bias"}
    assert read_json(a / "projector" / "config.json")["model_type"] == "projector"
    llm_keys = keys_of(a / "llm_adapter" / "adapter_model.safetensors")
    assert {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.1.mlp.gate_proj.lora_B.weight"} <= llm_keys and len(llm_keys) == 2 * 7 * 2
    vis_keys = keys_of(a / "visual_encoder_adapter" / "adapter_model.safetensors")
    assert {"base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.vision_model.encoder.layers.2.mlp.fc2.lora_B.weight"} <= vis_keys
    assert len(vis_keys) == 3 * 6 * 2
    config = read_json(a / "llm_adapter" / "adapter_config.json")
    assert (config["r"], config["lora_alpha"], config["task_type"]) == (4, 8, "CAUSAL_LM")
    assert not (a / "config.json").exists()  # a LoRA LLM is not written in full
    assert run(a, "--to", "xtuner", "--out", b, "--fp32", "--llm", bases / "llm", "--vision", bases / "vision") == 0
    _assert_same_tensors(a, b)

    # a fully trained LLM sits at the root of XTuner's folder, in HF Llama names
    a, b = tmp_path / "full_a", tmp_path / "full_b"
    assert run(full_run, "--to", "xtuner", "--out", a, "--fp32") == 0
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.down_proj.weight"} <= \
        keys_of(a / "model.safetensors")
    assert not (a / "llm_adapter").exists() and not (a / "visual_encoder_adapter").exists()
    assert run(a, "--to", "xtuner", "--out", b, "--fp32", "--vision", bases / "vision") == 0
    _assert_same_tensors(a, b)


def test_official_layout_names_and_round_trip(lora_run, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(lora_run, "--to", "official", "--out", a, "--fp32", "--verify") == 0
    names = keys_of(a / "model.safetensors")
    assert {"model.mm_projector.0.weight", "model.mm_projector.0.bias", "model.mm_projector.2.weight",
            "model.mm_projector.2.bias", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
            "model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight",
            "model.vision_tower.vision_tower.vision_model.post_layernorm.weight"} <= names
    assert not any("lora" in k for k in names)  # merged
    config = read_json(a / "config.json")
    assert (config["model_type"], config["mm_projector_type"], config["mm_vision_select_layer"]) == \
        ("llava_llama", "mlp2x_gelu", -2)
    assert run(a, "--to", "official", "--out", b, "--fp32") == 0
    _assert_same_tensors(a, b)


def _assert_same_tensors(a, b):
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].dtype == tb[k].dtype == torch.float32 and torch.equal(ta[k], tb[k]), k


# ----------------------------------------------------------------------------------------------------------------
# XTuner's training checkpoints: pickles read without running them


def _touch(path):
    """What a malicious or merely foreign pickle would run on load: here it only leaves a file behind."""
    Path(path).write_text("ran")
    return path


class MMEngineObject:
    """Stands for the mmengine objects in XTuner's `meta`: unpickling it calls _touch (via __reduce__)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __reduce__(self):
        return _touch, (self.flag,)


class MessageHub:
    """Stands for an mmengine object restored through __setstate__ (which writes a file)."""

    def __init__(self, flag):
        self.flag = str(flag)

    def __setstate__(self, state):
        Path(state["flag"]).write_text("ran")


@pytest.fixture(scope="module")
def xtuner_state(bases):
    """An XTuner LoRA finetune's trainable state: the projector, LLM LoRA on q/v, ViT LoRA on q/fc1 (r 4)."""
    torch.manual_seed(5)
    m = loader.build_model({"llm": str(bases / "llm"), "vision": str(bases / "vision"),
                       "projector": {"in": 32, "hidden": 32, "out": 32}}, dtype=torch.float32)
    lora.inject_lora(m.llm, ["q_proj", "v_proj"], 4, 16, 0.0)
    lora.inject_lora(m.vision, ["q_proj", "fc1"], 4, 16, 0.0)
    _randomize(m, std=0.3)
    sd = OrderedDict((f"projector.model.{j}.{p}", getattr(m.projector, f"linear_{i}").state_dict()[p])
                     for i, j in ((1, 0), (2, 2)) for p in ("weight", "bias"))
    for prefix, part, table in (("llm.", m.llm, llama.HF_KEYS), ("visual_encoder.", m.vision, clip.HF_KEYS)):
        to_hf = weights.hf_name_mapper(table)[0]
        for name, t in ((n, t) for n, t in part.state_dict().items() if '.lora_' in n):
            module, ab, _ = name.rsplit(".", 2)
            sd[f"{prefix}base_model.model.{to_hf(module)}.{ab}.default.weight"] = t.detach().clone()
    assert "llm.base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight" in sd
    assert "visual_encoder.base_model.model.vision_model.encoder.layers.2.mlp.fc1.lora_B.default.weight" in sd
    return sd


def test_xtuner_pth_file_and_deepspeed_folder_are_read_without_running_code(bases, xtuner_state, tmp_path):
    flags = [tmp_path / "reduce-ran", tmp_path / "setstate-ran"]
    pth = tmp_path / "iter_10.pth"
    torch.save({"meta": {"cfg": MMEngineObject(flags[0]), "hub": MessageHub(flags[1]), "epoch": 1},
                "state_dict": xtuner_state, "message_hub": MessageHub(flags[1])}, pth)
    ds = tmp_path / "iter_20.pth"  # DeepSpeed writes a folder under the same name, bf16 weights under "module"
    (ds / "checkpoint").mkdir(parents=True)
    torch.save({"module": OrderedDict((k, v.bfloat16()) for k, v in xtuner_state.items()),
                "ds_config": {"x": MMEngineObject(flags[0])}, "ds_version": "0.16"},
               ds / "checkpoint" / "mp_rank_00_model_states.pt")

    base = ["--llm", bases / "llm", "--vision", bases / "vision", "--fp32"]
    assert run(pth, "--to", "xtuner", "--out", tmp_path / "x", *base) == 0
    assert run(ds, "--to", "llm", "--out", tmp_path / "ds_llm", *base) == 0
    assert loader.read_projector(ds).keys() == {"linear_1.weight", "linear_1.bias", "linear_2.weight",
                                                 "linear_2.bias"}
    assert not any(f.exists() for f in flags), "unpickling ran code from the file"

    out = tensors(tmp_path / "x")
    for k, v in xtuner_state.items():
        if k.startswith("projector."):
            name = f"projector/model.safetensors:{k[len('projector.'):]}"
        else:
            prefix, rest = k.split(".", 1)
            folder = {"llm": "llm_adapter", "visual_encoder": "visual_encoder_adapter"}[prefix]
            name = f"{folder}/adapter_model.safetensors:{rest.replace('.default.', '.')}"
        assert torch.equal(out.pop(name), v), name
    assert not out  # nothing more, nothing less
    assert read_json(tmp_path / "x" / "llm_adapter" / "adapter_config.json")["lora_alpha"] == 16  # XTuner's

    # the DeepSpeed copy (bf16), merged: base + (16 / 4) B @ A
    merged = tensors(tmp_path / "ds_llm")["model.safetensors:model.layers.1.self_attn.v_proj.weight"]
    w = tensors(bases / "llm")["model.safetensors:model.layers.1.self_attn.v_proj.weight"]
    a = xtuner_state["llm.base_model.model.model.layers.1.self_attn.v_proj.lora_A.default.weight"].bfloat16().float()
    b = xtuner_state["llm.base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"].bfloat16().float()
    torch.testing.assert_close(merged, w + 4.0 * (b @ a), rtol=1e-5, atol=1e-5)

    torch.load(pth, weights_only=False)  # the sentinels are live: plain pickle runs them
    assert all(f.exists() for f in flags)


def test_xtuner_projector_folder_reads(xtuner_state, tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "projector"
    folder.mkdir()
    (folder / "config.json").write_text('{"architectures": ["ProjectorModel"], "model_type": "projector", '
                                        '"visual_hidden_size": 32, "llm_hidden_size": 32, "depth": 2}')
    save_file({k[len("projector."):]: v for k, v in xtuner_state.items() if k.startswith("projector.")},
              folder / "model.safetensors")
    got = loader.read_projector(folder)
    assert got.keys() == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert torch.equal(got["linear_1.weight"], xtuner_state["projector.model.0.weight"])
    assert torch.equal(got["linear_2.bias"], xtuner_state["projector.model.2.bias"])
    assert torch.equal(loader.read_projector(tmp_path)["linear_2.weight"], xtuner_state["projector.model.2.weight"])


# ----------------------------------------------------------------------------------------------------------------
# --verify


@pytest.mark.parametrize("layout", ["hf", "official", "xtuner"])
def test_verify_catches_a_tampered_export(lora_run, tmp_path, monkeypatch, layout):
    real = convert.save_safetensors

    def tampered(sd, folder, *args, **kwargs):  # nudge the projector's output bias in whatever layout it is written
        sd = {k: v + 0.5 if k.endswith("2.bias") else v for k, v in sd.items()}
        return real(sd, folder, *args, **kwargs)

    monkeypatch.setattr(convert, "save_safetensors", tampered)
    assert run(lora_run, "--to", layout, "--out", tmp_path / layout, "--fp32", "--verify") == 1
