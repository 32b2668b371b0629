"""Multi-GPU training logic on CPU: 2 gloo processes stand in for 2 GPUs.

What a GPU cluster would check, checked with the tiny demo models on the demo data (demo.py):
- a recipe's global batch holds on 1, 2, 4 and 8 GPUs (hand-derived accumulations), with an error when it cannot;
- the two launchers: `deepspeed --num_gpus 2` and `torchrun --nproc_per_node 2` (XTuner's `NPROC_PER_NODE=2` is
  refused with the command to use instead);
- ZeRO-3 (weights sharded) gives the loss curve and the model/ of one process without ZeRO, for the full-LLM + ViT
  LoRA recipe in fp32 (to fp32 rounding) and LoRA in bf16 (within bf16 noise); its model/ and its checkpoints
  (through `train.py export`) load with extras.loader.load_model;
- QLoRA (NF4 LLM + LoRA) under ZeRO-2 learns, and after each step both ranks hold the same weights;
- the MMBench evaluation, sharded over 2 ranks, answers as one process does;
- bench/train_synthetic.py (random weights of a named size, synthetic samples), which the 8B GPU measurements of
  docs/multi-gpu.md use, at tiny shapes.
References are independent of the code under test: hand-derived numbers, a one-process run without ZeRO, the
rank's own copy of the weights, the evaluation run in one process.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import demo
import train
from extras import checkpoint, loader
from test_train import run_inprocess

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ROOT / "recipes"

RUNNER = """
import os, sys
sys.path.insert(0, {root!r})
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no JIT build of DeepSpeed's CPU op
import torch, train

res = train.main(sys.argv[1:])  # the process group is gone after it: the rank from the launcher's variable
m = res["engine"].module  # this rank's own copy of the trainable weights (ZeRO-3: its shard only)
torch.save({{n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad}},
           os.path.join(res["out"], f"rank{{os.environ['RANK']}}.pt"))
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """The demo's tiny models and pictures, a 16-record finetune set, and a stage-1 output to --init-from."""
    root = tmp_path_factory.mktemp("demo")
    demo.write_data(root, n_pretrain=4, n_finetune=16, n_text=1, n_eval=16, seed=0)
    demo.write_models(root / "models")
    records = json.loads((root / "finetune.json").read_text())
    (root / "ft8.json").write_text(json.dumps([r for r in records if "image" in r][:8]))
    init = root / "pretrain" / "model"
    init.mkdir(parents=True)
    torch.manual_seed(0)
    save_file({"linear_1.weight": 0.1 * torch.randn(64, 64), "linear_1.bias": torch.zeros(64),
               "linear_2.weight": 0.1 * torch.randn(64, 64), "linear_2.bias": torch.zeros(64)},
              init / "projector.safetensors")
    (init / "llava.json").write_text("{}")
    runner = root / "run_train.py"
    runner.write_text(RUNNER.format(root=str(ROOT)))
    return {"root": root, "init": init, "runner": runner}


def recipe_args(demo_run, recipe, out, *extra, data="finetune.json"):
    """A real recipe with the demo's models and data, a short run, no worker processes."""
    root = demo_run["root"]
    return [f"@{RECIPES / recipe}.args", "--llm", str(root / "models" / "llm"), "--vision",
            str(root / "models" / "vision"), "--data", str(root / data), "--image-folder", str(root),
            "--init-from", str(demo_run["init"]), "--out", str(out), "--max-length", "512", "--num-workers", "0",
            "--save-steps", "1000", "--eval-every", "1000", *extra]


def launch(demo_run, launcher, argv, **env):
    """train.py in 2 gloo processes through `launcher`: deepspeed | torchrun."""
    from conftest import free_port

    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **env)
    runner, port = str(demo_run["runner"]), str(free_port())
    cmd = {"deepspeed": [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", port,
                         runner],
           "torchrun": [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                        runner]}[launcher]
    p = subprocess.run(cmd + argv, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def losses(out):
    return [json.loads(ln)["loss"] for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_files(a, b, exact=False, rtol=1e-4, atol=1e-6):
    """Every safetensors file of model folder a equals b's (same keys; values exactly, or to the tolerance)."""
    files = sorted(p.relative_to(a) for p in Path(a).rglob("*.safetensors"))
    assert files == sorted(p.relative_to(b) for p in Path(b).rglob("*.safetensors")) and files
    for f in files:
        x, y = load_file(Path(a) / f), load_file(Path(b) / f)
        assert x.keys() == y.keys(), f
        for k in x:
            if exact:
                assert torch.equal(x[k], y[k]), (f, k)
            else:
                torch.testing.assert_close(x[k].float(), y[k].float(), rtol=rtol, atol=atol, msg=f"{f} {k}")


# ----------------------------------------------------------------------------------------------------------------
# The global batch of a recipe, and the launch flags


def load_recipe(name, world_size, *extra):
    req = ["--llm", "x", "--vision", "y"]
    return train.resolve_args(train.parse_args([f"@{RECIPES / name}.args", *req, *extra]), world_size)


@pytest.mark.parametrize("name, micro, glob, acc_by_gpus", [
    # accumulation = global / (micro x GPUs), by hand; on 8 GPUs these are XTuner's own
    ("pretrain", 16, 256, {1: 16, 2: 8, 4: 4, 8: 2}),
    ("sharegpt4v-pretrain", 16, 256, {1: 16, 2: 8, 4: 4, 8: 2}),
    ("finetune-full-vitlora", 8, 128, {1: 16, 2: 8, 4: 4, 8: 2}),
    ("internvl-finetune", 4, 128, {1: 32, 2: 16, 4: 8, 8: 4}),
    ("qlora-finetune-gpu1", 1, 128, {1: 128, 2: 64, 4: 32, 8: 16}),
])
def test_recipe_global_batch_on_1_2_4_8_gpus(name, micro, glob, acc_by_gpus):
    for gpus, acc in acc_by_gpus.items():
        a = load_recipe(name, gpus)
        assert (a.micro_batch, a.accumulation, a.global_batch) == (micro, acc, glob), gpus


def test_recipe_global_batch_that_cannot_divide():
    with pytest.raises(SystemExit, match=r"--global-batch 128 is not divisible by --micro-batch 8 x 3 processes = 24"):
        load_recipe("finetune-full-vitlora", 3)
    with pytest.raises(SystemExit, match=r"--global-batch 256 is not divisible by --micro-batch 16 x 32 processes"):
        load_recipe("pretrain", 32)  # 4 nodes of 8: micro 16 x 32 = 512 > 256; the fix is --micro-batch 8
    assert load_recipe("pretrain", 32, "--micro-batch", "8").accumulation == 1


def test_xtuner_deepspeed_names(tmp_path, monkeypatch, capsys):
    """`--deepspeed NAME` as XTuner spells it (the one way to choose the ZeRO stage), or a DeepSpeed JSON."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.json").write_text('{"zero_optimization": {"stage": 3}}')
    stage = lambda a: train.deepspeed_config(a)["zero_optimization"]  # noqa: E731
    a = load_recipe("pretrain", 1)
    assert a.deepspeed == "deepspeed_zero2" and stage(a)["stage"] == 2 and "offload_optimizer" not in stage(a)
    assert stage(load_recipe("pretrain", 1, "--deepspeed", "deepspeed_zero3"))["stage"] == 3
    z = stage(load_recipe("pretrain", 1, "--deepspeed", "deepspeed_zero2_offload"))
    assert (z["stage"], z["offload_optimizer"]["device"]) == (2, "cpu")
    a = load_recipe("pretrain", 1, "--deepspeed", "deepspeed_zero3", "--deepspeed", "deepspeed_zero1")  # the last
    assert stage(a) == {"stage": 1, "overlap_comm": True}
    a = load_recipe("pretrain", 1, "--deepspeed", "my.json")
    assert a.deepspeed == "my.json" and stage(a)["stage"] == 3
    for wrong in (["--deepspeed", "deepspeed_zero4"], ["--zero", "3"], ["--deepspeed-config", "my.json"]):
        with pytest.raises(SystemExit):
            load_recipe("pretrain", 1, *wrong)
    # a JSON that is not there stops at the command line (it used to fail after the whole data pass), naming it
    with pytest.raises(SystemExit):
        load_recipe("pretrain", 1, "--deepspeed", "other.json")
    assert "argument --deepspeed: other.json: no such file; give one of deepspeed_zero0" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(SystemExit, match=r"^--deepspeed bad.json: not valid JSON \(.*line 1"):
        stage(load_recipe("pretrain", 1, "--deepspeed", "bad.json"))


def test_one_launch_path(monkeypatch):
    """One process: `python train.py`; several: a launcher. XTuner's NPROC_PER_NODE is refused with the command to
    use instead (train.py does not start processes itself), unless a launcher started this process (RANK set)."""
    monkeypatch.setattr(train, "train", lambda args: "trained here")
    for k in ("RANK", "NPROC_PER_NODE", "NNODES", "NODE_RANK", "ADDR", "PORT"):
        monkeypatch.delenv(k, raising=False)
    argv = ["--stage", "pretrain", "--llm", "x", "--vision", "y", "--data", "d.json"]
    assert train.main(argv) == "trained here"  # nothing set: one process, no launcher
    monkeypatch.setenv("NPROC_PER_NODE", "4")
    with pytest.raises(SystemExit, match=r"NPROC_PER_NODE=4: .*`deepspeed --num_gpus 4 train.py \.\.\.` or "
                                         r"`torchrun --nproc_per_node 4 train.py \.\.\.`"):
        train.main(argv)
    monkeypatch.setenv("RANK", "5")  # already a launched process: train here
    assert train.main(argv) == "trained here"


# ----------------------------------------------------------------------------------------------------------------
# ZeRO-3 in 2 processes against one process without ZeRO


def test_zero3_full_llm_vit_lora_matches_one_process(demo_run, tmp_path):
    """The full-LLM + ViT-LoRA recipe in fp32, 3 steps of global batch 4: 2 ranks x micro 2 under ZeRO-3 (launched
    by `deepspeed --num_gpus 2`) against 1 process x micro 2 x accumulation 2 without ZeRO. Then model/ and the
    checkpoints load, and the MMBench evaluation on 2 ranks answers as on one."""
    import eval_mmbench

    common = ["--micro-batch", "2", "--global-batch", "4", "--max-steps", "3", "--save-steps", "2", "--dtype", "fp32",
              "--lr", "1e-3", "--vision-lora-dropout", "0"]
    two, one = tmp_path / "two", tmp_path / "one"
    launch(demo_run, "deepspeed", recipe_args(demo_run, "finetune-full-vitlora", two, *common, "--deepspeed",
                                              "deepspeed_zero3"))
    run_inprocess(recipe_args(demo_run, "finetune-full-vitlora", one, *common, "--deepspeed", "deepspeed_zero0"))
    # fp32 sums in another order (2 ranks, reduce-scatter) and Adam's division by sqrt(v) magnifies it: observed
    # 1e-5 relative after 10 steps, so 1e-4
    assert len(losses(two)) == 3 and losses(two) == pytest.approx(losses(one), rel=1e-4)
    assert losses(two)[-1] < losses(two)[0]
    assert_same_files(two / "model", one / "model", rtol=1e-3, atol=1e-5)
    shard = torch.load(two / "rank0.pt")  # ZeRO-3 keeps a shard per rank, not the whole weight
    assert shard["llm.embed_tokens.weight"].numel() == 0

    # the stage output reads as every tool reads it; a checkpoint becomes the same folder through `export`
    m, _, cfg = loader.load_model(two / "model", dtype=torch.float32)
    assert (cfg["llm_mode"], cfg["vision_lora"]["r"]) == ("full", 64)
    saved = load_file(two / "model" / "llm" / "model.safetensors")
    assert torch.equal(m.llm.embed_tokens.weight, saved["model.embed_tokens.weight"])
    train.main(["export", str(two / "checkpoints" / "step_3"), str(tmp_path / "step3")])
    assert_same_files(tmp_path / "step3", two / "model", exact=True)  # fp32: the master weights are the weights
    train.main(["export", str(two), str(tmp_path / "latest")])  # a run folder: its newest checkpoint
    assert_same_files(tmp_path / "latest", two / "model", exact=True)
    train.main(["export", str(two / "checkpoints" / "step_2"), str(tmp_path / "step2")])
    m2, _, _ = loader.load_model(tmp_path / "step2", dtype=torch.float32)
    assert not torch.equal(m2.llm.embed_tokens.weight, m.llm.embed_tokens.weight)  # one step earlier

    # MMBench on 2 ranks (each answers its shard) gives the predictions of one process
    tsv = demo_run["root"] / "eval.tsv"
    argv = ["--data", str(tsv), "--model", str(two / "model"), "--limit", "8", "--batch-size", "1",
            "--max-new-tokens", "6"]
    from conftest import free_port

    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                        f"--master_port={free_port()}", str(ROOT / "eval_mmbench.py"), *argv, "--out",
                        str(tmp_path / "ev2")], cwd=ROOT, env={**e, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    eval_mmbench.main([*argv, "--out", str(tmp_path / "ev1")])

    def predictions(d):
        rows = (d / "predictions.jsonl").read_text().splitlines()
        return {r["index"]: r["prediction"] for r in map(json.loads, rows)}

    assert predictions(tmp_path / "ev2") == predictions(tmp_path / "ev1") and len(predictions(tmp_path / "ev1")) == 8
    assert (tmp_path / "ev2" / "partial-rank1.jsonl").exists()


def test_zero3_lora_bf16_within_bf16_noise(demo_run, tmp_path):
    """LLM LoRA in bf16 (on the demo finetune recipe), 2 ranks under ZeRO-3 (torchrun) against 1 process under
    ZeRO-2: the same curve within bf16 noise, and the final checkpoint exports to the very model/ of the run."""
    # 17 samples: one process would also train a third step on the one sample 2 ranks leave out (17 % 2)
    common = ["--lora", "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "1e-3",
              "--micro-batch", "4", "--global-batch", "8", "--max-steps", "2"]
    two, one, fp32 = tmp_path / "two", tmp_path / "one", tmp_path / "fp32"
    launch(demo_run, "torchrun", recipe_args(demo_run, "demo-finetune", two, *common, "--dtype", "bf16",
                                             "--deepspeed", "deepspeed_zero3"))
    run_inprocess(recipe_args(demo_run, "demo-finetune", one, *common, "--dtype", "bf16"))  # the recipe's ZeRO-2
    run_inprocess(recipe_args(demo_run, "demo-finetune", fp32, *common, "--dtype", "fp32"))
    # bf16 keeps 8 significant bits: observed 3e-4 relative over 10 steps of the full-LLM recipe (fp32: 1e-5)
    assert len(losses(two)) == 2 and losses(two) == pytest.approx(losses(one), rel=2e-3)
    # Adam moves each weight by about lr whatever its gradient's size, so where a gradient is near 0 bf16 rounding
    # flips the step's sign (lora_B starts at 0: all of it is such a step). So no elementwise tolerance: the weights
    # of 2 ranks must be nearer to 1 process's than bf16 weights are to fp32 ones (the same run in fp32)
    for f in ("projector.safetensors", "llm_adapter/adapter_model.safetensors"):
        w2, w1, w32 = (load_file(d / "model" / f) for d in (two, one, fp32))

        def distance(a, b):
            return sum(((a[k].float() - b[k].float()) ** 2).sum() for k in a).sqrt().item()

        assert w2.keys() == w1.keys()
        # observed for lora_B, per tensor relative to |B|: at most 0.14 between 2 ranks and 1, 0.47 bf16 vs fp32
        assert distance(w2, w1) < distance(w1, w32), f
    train.main(["export", str(two / "checkpoints" / "step_2"), str(tmp_path / "export")])
    assert_same_files(tmp_path / "export", two / "model", exact=True)  # bf16(fp32 master) is the bf16 weight
    m, _, cfg = loader.load_model(tmp_path / "export", dtype=torch.float32)
    assert cfg["llm_lora"]["r"] == 8 and m.llm.layers[0].self_attn.q_proj.lora_B.weight.abs().sum() > 0


def test_resume_needs_the_same_number_of_processes(tmp_path):
    ck = tmp_path / "checkpoints" / "step_4"
    ck.mkdir(parents=True)
    (ck / "trainer_state.json").write_text(json.dumps({"step": 4, "epoch": 0, "consumed": 8, "world": 2, "args": {}}))
    with pytest.raises(SystemExit, match="written by 2 processes, this run has 1: resume with 2"):
        checkpoint.load_checkpoint(None, tmp_path / "checkpoints", "step_4")  # refused before DeepSpeed reads anything


# ----------------------------------------------------------------------------------------------------------------
# QLoRA data-parallel


def test_qlora_zero2_two_ranks_learn_and_agree(demo_run, tmp_path):
    """The one-GPU QLoRA recipe on 2 ranks (`deepspeed --num_gpus 2 train.py ...`), ZeRO-2: every step
    trains on the same 8 samples, so the loss must fall at each step; each rank's own copy of the trainable weights
    is the same after the sharded optimizer steps (ZeRO-2 updates a half on each rank, then shares it)."""
    out = tmp_path / "run"
    launch(demo_run, "deepspeed", recipe_args(demo_run, "qlora-finetune-gpu1", out, "--micro-batch", "4",
                                           "--global-batch", "8", "--epochs", "3", "--lr", "3e-3", "--lora-r", "8",
                                           "--lora-dropout", "0", data="ft8.json"))
    args = json.loads((out / "args.json").read_text())
    assert (args["llm_mode"], args["deepspeed"], args["accumulation"], args["dtype"]) == (
        "qlora", "deepspeed_zero2", 1, "bf16")
    curve = losses(out)
    assert len(curve) == 3 and curve[0] > curve[1] > curve[2]
    r0, r1 = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    assert r0.keys() == r1.keys() and any(".lora_B." in k for k in r0)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    assert all(r0[k].abs().sum() > 0 for k in r0 if ".lora_B." in k)  # B starts at zero: it trained


# ----------------------------------------------------------------------------------------------------------------
# Random 8B-shaped weights and synthetic data for the GPU measurements (bench/train_synthetic.py), at tiny shapes


def test_synthetic_data_and_random_init(tmp_path):
    import clip
    import llama
    from bench import train_synthetic as bench

    ds = bench.SyntheticData(5, length=80, image_tokens=64, image_size=64, vocab_size=128256, seed=3)
    a, b = ds[2], ds[2]
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], ds[3]["input_ids"])
    ids, labels = a["input_ids"], a["labels"]
    assert ids.shape == (80,) and (ids[1:65] == -200).all() and (ids[65:] >= 0).all() and (ids < 128000).all()
    # 80 - 64 = 16 text ids, the last 8 supervised
    assert (labels[:72] == -100).all() and torch.equal(labels[72:], ids[72:])
    assert a["pixel_values"].shape == (1, 3, 64, 64) and ds.problems() == []
    with pytest.raises(SystemExit, match="--max-length 66 leaves no room"):
        bench.SyntheticData(5, length=66, image_tokens=64, image_size=64, vocab_size=100)

    cfg = {"vision": bench.size_folder("tiny", clip.CLIPConfig, clip.CONFIGS, tmp_path),
           "llm": bench.size_folder("tiny", llama.LlamaConfig, llama.CONFIGS, tmp_path / "llm"),
           "projector": {"in": 64, "hidden": 64, "out": 64}}
    m = bench.random_model(cfg, torch.bfloat16, "cpu")
    want = sum(p.numel() for p in llama.Llama(llama.LlamaConfig.from_name("tiny")).parameters())
    assert sum(p.numel() for p in m.llm.parameters()) == want
    assert m.vision.cfg == clip.CLIPConfig.from_name("tiny") and {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert m.llm.inv_freq.dtype == torch.float32 and torch.get_default_dtype() == torch.float32

    from test_train import stub_shm_op

    stub_shm_op()
    out = tmp_path / "syn"
    res = bench.main(["--stage", "finetune", "--llm", "tiny", "--vision", "tiny", "--synthetic", "8",
                      "--max-length", "80", "--micro-batch", "4", "--max-steps", "2", "--dtype", "fp32",
                      "--num-workers", "0", "--lora", "--out", str(out), "--checkpoint-layers", "1"])
    assert res["engine"].module.llm.activation_checkpointing == 1  # the first block recomputed, the other kept
    trainable = sum(p.numel() for p in res["engine"].module.parameters() if p.requires_grad)
    assert res["engine"].optimizer.reduce_bucket_size == trainable  # not DeepSpeed's 5e8 (train.deepspeed_config)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2] and all(r["world"] == 1 for r in recs)
    # N(0, 0.02) weights give near-uniform logits: the loss starts at ln(vocab)
    assert recs[0]["loss"] == pytest.approx(float(torch.log(torch.tensor(128256.0))), abs=0.1)
    assert res["losses"] == [r["loss"] for r in recs] and recs[0]["samples_s"] > 0
    assert not (out / "checkpoints").exists() and not (out / "model").exists()  # nothing saved
    with pytest.raises(SystemExit, match=r"--vision tiny: no config.json there \(give the folder of an HF checkpoint"):
        train.model_config(train.parse_args(["--stage", "pretrain", "--llm", "tiny", "--vision", "tiny", "--data",
                                             "d.json"]))  # size names are for bench/train_synthetic.py only
