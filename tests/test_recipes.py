"""Every recipe file parses, and its resolved hyper-parameters are XTuner's (from its LLaVA-Llama-3 configs, typed in
by hand here); the QLoRA recipe, with a tiny model substituted, really trains only LoRA + projector on an NF4 LLM."""
import json
from pathlib import Path

import pytest
import torch

import lora
import train

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

P = "./data/llava_data/LLaVA-Pretrain/"
MIX665K = ["./data/llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json"]
IV = "./data/internvl_sft/"
INTERNVL = [f"{IV}sharegpt4v_instruct_gpt4-vision_cap100k.jsonl:{IV}data",
            f"{IV}llava_instruct_150k_zh.jsonl:{IV}data/coco",
            f"{IV}sharegpt4v_mix665k_cap23k_coco-ap9k_lcs3k_sam9k_div2k.jsonl:{IV}data",
            f"{IV}dvqa_train_200k.jsonl:{IV}data/dvqa",
            f"{IV}chartqa_train_18k.jsonl:{IV}data/chartqa",
            f"{IV}ai2d_train_12k.jsonl:{IV}data/ai2d",
            f"{IV}docvqa_train_10k.jsonl:{IV}data/docvqa",
            f"{IV}geoqa+.jsonl:{IV}data/geoqa+",
            f"{IV}synthdog_en.jsonl:{IV}data/synthdog-en"]

# XTuner's configs: micro-batch, accumulation and GPUs as XTuner runs them; max length + 576 image positions
# name: (stage, llm_mode, vision_lora, micro, acc, gpus, global, lr, max_len, save/eval, image_mode, data, folder)
TABLE = {
    "pretrain": ("pretrain", "frozen", False, 16, 2, 8, 256, 1e-3, 1472 + 576, 500, "crop",  # XTuner: 32 x 1
                 [P + "blip_laion_cc_sbu_558k.json"], P + "images"),
    "sharegpt4v-pretrain": ("pretrain", "frozen", False, 16, 2, 8, 256, 1e-3, 3520 + 576, 1000, "crop",
                            ["./data/sharegpt4v/share-captioner_coco_lcs_sam_1246k_1107.json"], "./data/sharegpt4v/data"),
    "quant-pretrain-gpu1": ("pretrain", "frozen-nf4", False, 1, 256, 1, 256, 1e-3, 1472 + 576, 50000, "crop",
                            [P + "blip_laion_cc_sbu_558k.json"], P + "images"),
    "finetune-full-vitlora": ("finetune", "full", True, 8, 2, 8, 128, 2e-5, 1472 + 576, 1000, "pad",
                              MIX665K, "./data/llava_data/llava_images"),
    "internvl-finetune": ("finetune", "full", True, 4, 4, 8, 128, 2e-5, 3520 + 576, 5000, "pad", INTERNVL, None),
    "qlora-finetune-gpu1": ("finetune", "qlora", False, 1, 128, 1, 128, 2e-4, 1472 + 576, 50000, "pad",
                            MIX665K, "./data/llava_data/llava_images"),
}
INIT_FROM = {"finetune-full-vitlora": "runs/llava-llama3-pretrain/model",
             "internvl-finetune": "runs/llava-llama3-sharegpt4v-pretrain/model",
             "qlora-finetune-gpu1": "runs/llava-llama3-quant-pretrain/model"}


def load(name, world_size, *extra):
    return train.resolve_args(train.parse_args([f"@{RECIPES / name}.args", *extra]), world_size)


def test_every_recipe_file_is_in_the_table():
    # the InternLM2 recipes are checked against their own table in tests/test_internlm2.py
    names = {p.stem for p in RECIPES.glob("*.args")
             if not p.stem.startswith("internlm2-")} - {"demo-pretrain", "demo-finetune"}
    assert names == set(TABLE)
    for demo in ("demo-pretrain", "demo-finetune"):
        load(demo, 1)  # parses and resolves


@pytest.mark.parametrize("name", sorted(TABLE))
def test_recipe_matches_xtuner(name):
    stage, mode, vlora, micro, acc, gpus, glob, lr, max_len, every, image_mode, data, folder = TABLE[name]
    a = load(name, gpus)
    got = (a.stage, a.llm_mode, a.vision_lora, a.micro_batch, a.accumulation, a.global_batch, a.lr, a.max_length,
           a.save_steps, a.eval_every, a.image_mode, a.data, a.image_folder)
    assert got == (stage, mode, vlora, micro, acc, glob, lr, max_len, every, every, image_mode, data, folder)
    # XTuner's common settings (§4.1): AdamW (0.9, 0.999), no weight decay, clip 1.0, 3% warmup, one epoch, 2 kept
    assert (tuple(a.betas), a.weight_decay, a.grad_clip, a.warmup_ratio, a.epochs, a.save_total_limit) == (
        (0.9, 0.999), 0.0, 1.0, 0.03, 1, 2)
    # XTuner recomputes every block; our pretrain recipe's micro-batch of 16 needs no recomputation on 80 GB cards
    assert (a.template, a.select_layer, a.deepspeed, a.dtype, a.activation_checkpointing) == (
        "llama3_chat", -2, "deepspeed_zero2", "bf16", name != "pretrain")
    assert a.num_workers == (0 if "gpu1" in name else 4)
    assert a.init_from == INIT_FROM.get(name)
    if mode == "qlora":
        assert (a.lora_r, a.lora_alpha, a.lora_dropout) == (64, 16, 0.05)
    if vlora:
        assert (a.vision_lora_r, a.vision_lora_alpha, a.vision_lora_dropout) == (64, 16, 0.05)
    # the global batch stays when the GPU count changes; the accumulation follows
    one = load(name, 1)
    assert (one.global_batch, one.accumulation) == (glob, glob // micro)


def test_qlora_recipe_trains_only_lora_and_projector(tmp_path, capsys):
    """The real recipe with a tiny model, tiny data and a short run substituted by extra flags."""
    from safetensors.torch import load_file, save_file

    from test_train import run_inprocess, write_records, write_tiny_models

    llm, vision = write_tiny_models(tmp_path)
    records = write_records(tmp_path, 4)
    init = tmp_path / "pretrain" / "model"  # a stage-1 output: llava.json + projector.safetensors
    init.mkdir(parents=True)
    torch.manual_seed(1)
    proj = {"linear_1.weight": torch.randn(32, 32), "linear_1.bias": torch.randn(32),
            "linear_2.weight": torch.randn(32, 32), "linear_2.bias": torch.randn(32)}
    save_file(proj, init / "projector.safetensors")
    (init / "llava.json").write_text(json.dumps({"llm_mode": "frozen-nf4"}))

    res = run_inprocess([f"@{RECIPES / 'qlora-finetune-gpu1.args'}", "--llm", str(llm), "--vision", str(vision),
                         "--data", str(records), "--image-folder", str(tmp_path / "images"), "--init-from", str(init),
                         "--global-batch", "2", "--max-steps", "1", "--out", str(tmp_path / "run")])
    assert "without --init-from" not in capsys.readouterr().out  # the finetune starts from stage 1's projector
    args = json.loads((tmp_path / "run" / "args.json").read_text())
    assert (args["llm_mode"], args["lora_r"], args["lora_alpha"], args["dtype"]) == ("qlora", 64, 16, "bf16")
    m = res["engine"].module
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") or ".lora_A." in n or ".lora_B." in n for n in trainable)
    assert not any(n.startswith("vision.") for n in trainable)
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    wrapped = {n.rpartition(".")[2]: mod for n, mod in m.llm.named_modules() if isinstance(mod, lora.LoRALinear)}
    assert set(wrapped) == targets
    for n, mod in m.llm.named_modules():
        if isinstance(mod, lora.LoRALinear):
            import bitsandbytes as bnb

            assert mod.nf4 and mod.r == 64 and isinstance(mod.weight, bnb.nn.Params4bit)
            assert mod.weight.dtype == torch.uint8 and mod.weight.quant_state.quant_type == "nf4"
            assert mod.weight.quant_state.nested  # double quantization: the absmaxes are quantized too
    assert not any(isinstance(mod, lora.LoRALinear) for mod in m.vision.modules())
    out = tmp_path / "run" / "model"
    assert (out / "llm_adapter" / "adapter_model.safetensors").exists() and not (out / "llm").exists()
    assert not (out / "vision_adapter").exists()
    cfg = json.loads((out / "llava.json").read_text())
    assert cfg["llm_mode"] == "qlora" and cfg["llm_lora"]["r"] == 64 and cfg["vision_lora"] is None
    # the projector started from --init-from and then trained
    saved = load_file(out / "projector.safetensors")
    assert not torch.equal(saved["linear_1.weight"], proj["linear_1.weight"])
    assert torch.allclose(saved["linear_1.weight"].float(), proj["linear_1.weight"], atol=0.05)
