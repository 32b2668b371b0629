"""train.py on CPU with tiny random models: loss normalisation, multi-process equivalence, kill-and-resume, bad data.

The models are written by our own clip.save_clip / llama.save_llama (random weights, HF layout) with Meta's real
Llama-3 tokenizer.model copied in (from the llama-models test dependency). References are independent of train.py:
the loss and gradient of a plain PyTorch forward over the same samples, a run never killed, a one-process run.
"""
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import clip
import data
from extras import datasets
import llama
import train
from extras import loader
from extras.samplers import ShuffleSampler

ROOT = Path(__file__).resolve().parent.parent
IMAGE = 32  # tiny CLIP input: 32 px, patch 8 -> 16 image positions per image


def stub_shm_op():
    """DeepSpeed JIT-builds its shared-memory op at the first init on a CPU machine (~25 s); only
    inference_all_reduce uses it."""
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def write_tiny_models(folder):
    """folder/llm (Llama, vocab of the real Llama-3 tokenizer, hidden 32) and folder/vision (CLIP, 32 px)."""
    import llama_models

    torch.manual_seed(0)
    vcfg = clip.CLIPConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_layers=2, num_heads=2,
                           intermediate_size=64)
    clip.save_clip(clip.CLIPVisionTower(vcfg), folder / "vision")
    lcfg = llama.LlamaConfig(vocab_size=128256, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                             intermediate_size=64, max_position_embeddings=512)
    llama.save_llama(llama.Llama(lcfg), folder / "llm", dtype=torch.float32)
    (folder / "llm" / "original").mkdir()
    shutil.copy(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model", folder / "llm" / "original")
    return folder / "llm", folder / "vision"


WORDS = "red green blue circle square big small left right top bottom shape colour picture".split()


def write_records(folder, n, seed=0, name="train.json", size=(40, 30)):
    """n LLaVA records about n small PNGs, answers of different lengths."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"images/{i}.png")
        answer = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 12))))
        recs.append({"id": f"r{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nDescribe the picture."},
                                       {"from": "gpt", "value": answer}]})
    (folder / name).write_text(json.dumps(recs))
    return folder / name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    llm, vision = write_tiny_models(root)
    records = write_records(root, 16)
    return {"root": root, "llm": llm, "vision": vision, "data": records, "images": root / "images"}


def base_args(tiny, out, *extra, data=None, images=None):
    return ["--stage", "pretrain", "--llm", str(tiny["llm"]), "--vision", str(tiny["vision"]),
            "--data", str(data or tiny["data"]), "--image-folder", str(images or tiny["images"]), "--out", str(out),
            "--dtype", "fp32", "--num-workers", "0", "--lr", "1e-2", "--save-steps", "1000", *extra]


def run_inprocess(argv):
    stub_shm_op()
    return train.main(argv)


# ----------------------------------------------------------------------------------------------------------------
# Argument handling


def test_accumulation_from_global_batch():
    req = ["--llm", "x", "--vision", "y", "--data", "d.json"]
    a = train.resolve_args(train.parse_args(["--stage", "pretrain", "--micro-batch", "4", "--global-batch", "32", *req]), 2)
    assert (a.accumulation, a.global_batch, a.llm_mode, a.image_mode, a.lr) == (4, 32, "frozen", "crop", 1e-3)
    with pytest.raises(SystemExit, match=r"--global-batch 30 .* --micro-batch 4 x 2 processes = 8"):
        train.resolve_args(train.parse_args(["--stage", "pretrain", "--micro-batch", "4", "--global-batch", "30", *req]), 2)
    a = train.resolve_args(train.parse_args(["--stage", "finetune", "--qlora", "--no-activation-checkpointing", *req]), 1)
    assert (a.llm_mode, a.image_mode, a.lr, a.activation_checkpointing, a.accumulation) == ("qlora", "pad", 2e-4,
                                                                                          False, 1)
    # one spelling per LLM mode: --lora / --qlora for the adapters, --llm-mode for the rest (the last one given wins)
    assert train.parse_args(["--stage", "finetune", "--llm-mode", "full", "--lora", *req]).llm_mode == "lora"
    assert train.parse_args(["--stage", "finetune", "--qlora", "--llm-mode", "frozen-nf4", *req]).llm_mode == "frozen-nf4"
    for gone in (["--llm-mode", "lora"], ["--llm-mode", "qlora"], ["--zero", "2"], ["--deepspeed-config", "x.json"],
                 ["--offload-optimizer"], ["--recipe-data", "d.json"], ["--plot"], ["--synthetic", "8"],
                 ["--random-init"], ["--no-save"], ["--glob", "8"]):  # nor abbreviations: one spelling per option
        with pytest.raises(SystemExit):
            train.parse_args(["--stage", "finetune", *req, *gone])


@pytest.mark.parametrize("flag", ["--max-steps", "--epochs", "--save-steps", "--lora-r", "--vision-lora-r",
                                  "--micro-batch", "--global-batch", "--accumulation", "--max-length", "--loss-chunk",
                                  "--eval-max-new-tokens"])
def test_a_count_of_zero_is_a_usage_error(flag, capsys):
    """Each of these counts something the run needs at least one of. 0 used to be taken silently: --max-steps 0 as
    "no limit", --lora-r 0 as adapters with no rank (the run trained, then failed to save them), --save-steps 0 as a
    division by zero after the first step, --accumulation 0 as 1. argparse now refuses it, naming the flag."""
    req = ["--stage", "finetune", "--llm", "x", "--vision", "y", "--data", "d.json"]
    for value in ("0", "-2", "two"):
        with pytest.raises(SystemExit) as e:
            train.parse_args([*req, flag, value])
        assert e.value.code == 2
        assert f"argument {flag}: '{value}' is not a whole number of at least 1" in capsys.readouterr().err
    assert getattr(train.parse_args([*req, flag, "3"]), flag[2:].replace("-", "_")) == 3


def test_recipe_file_comments_and_override(tmp_path):
    (tmp_path / "r.args").write_text("# a recipe\n--stage finetune   # stage 2\n\n--lr 2e-5\n--eval-prompt 'two words'\n"
                                     "--llm a\n--vision b\n--data 'x y.json'\n")
    a = train.parse_args([f"@{tmp_path / 'r.args'}", "--lr", "3e-4"])
    assert (a.stage, a.lr, a.eval_prompt, a.data) == ("finetune", 3e-4, ["two words"], ["x y.json"])
    # the command line overrides the recipe wherever the @FILE stands
    assert train.parse_args(["--lr", "3e-4", f"@{tmp_path / 'r.args'}"]).lr == 3e-4
    # --accumulation and --global-batch size the step: one on the command line replaces the recipe's other one
    (tmp_path / "g.args").write_text("--global-batch 64\n")
    a = train.parse_args(["--stage", "pretrain", "--llm", "a", "--vision", "b", "--data", "d", f"@{tmp_path / 'g.args'}",
                          "--accumulation", "3"])
    assert (a.global_batch, a.accumulation) == (None, 3)
    (tmp_path / "a.args").write_text("--accumulation 4\n")
    a = train.parse_args([f"@{tmp_path / 'r.args'}", f"@{tmp_path / 'a.args'}", "--global-batch", "16"])
    assert (a.global_batch, a.accumulation) == (16, None)
    # ... but both in one place is an error
    with pytest.raises(SystemExit):
        train.parse_args([f"@{tmp_path / 'r.args'}", "--global-batch", "16", "--accumulation", "2"])
    with pytest.raises(SystemExit):
        train.parse_args([f"@{tmp_path / 'r.args'}", f"@{tmp_path / 'a.args'}", f"@{tmp_path / 'g.args'}"])
    # a list flag on the command line replaces the recipe's list instead of adding to it
    a = train.parse_args([f"@{tmp_path / 'r.args'}", "--data", "mine.json", "--data=more.json"])
    assert (a.data, a.eval_prompt) == (["mine.json", "more.json"], ["two words"])
    a = train.parse_args([f"@{tmp_path / 'r.args'}", "--eval-prompt", "other"])
    assert (a.data, a.eval_prompt) == (["x y.json"], ["other"])
    with pytest.raises(SystemExit):  # a recipe that is not there
        train.parse_args([f"@{tmp_path / 'missing.args'}"])


def test_lr_schedule():
    total = 100  # warmup = 3 steps
    f = [train.lr_factor(s, total) for s in range(total)]
    assert f[0] == pytest.approx(1e-5) and f[1] == pytest.approx(1e-5 + (1 - 1e-5) / 3) and f[3] == 1.0
    assert all(a > b for a, b in zip(f[3:], f[4:])) and 0 < f[-1] < 1e-3
    assert f[3 + 48] == pytest.approx(0.5 * (1 + np.cos(np.pi * 48 / 97)))


def test_deepspeed_config_merge(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_clipping": "auto", "zero_optimization": {
        "stage": 3, "reduce_bucket_size": 5}, "bf16": {"enabled": "auto"}}))
    a = train.resolve_args(train.parse_args(["--stage", "pretrain", "--llm", "x", "--vision", "y", "--data", "d",
                                         "--global-batch", "8", "--deepspeed", str(tmp_path / "ds.json")]), 1)
    cfg = train.deepspeed_config(a)
    assert cfg["gradient_clipping"] == 1.0 and cfg["bf16"] == {"enabled": True}
    assert cfg["zero_optimization"]["stage"] == 3 and cfg["zero_optimization"]["reduce_bucket_size"] == 5
    assert cfg["zero_optimization"]["overlap_comm"] is True  # deepspeed_zero2's entries the JSON leaves alone
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"]) == (1, 8)
    # the presets: offload, and the gradient buckets never larger than all the trainable parameters (a user's JSON
    # still wins, above)
    a.deepspeed = "deepspeed_zero2_offload"
    cfg = train.deepspeed_config(a, trainable=1234)["zero_optimization"]
    assert cfg["offload_optimizer"]["device"] == "cpu" and cfg["reduce_bucket_size"] == 1234
    a.deepspeed = "deepspeed_zero2"
    assert "offload_optimizer" not in train.deepspeed_config(a)["zero_optimization"]
    assert train.deepspeed_config(a, trainable=10 ** 10)["zero_optimization"]["reduce_bucket_size"] == 500_000_000
    # one process: nothing to overlap or communicate, so one small staging bucket instead of two full-size ones
    alone = train.deepspeed_config(a, trainable=10 ** 10, world_size=1)["zero_optimization"]
    assert alone["overlap_comm"] is False and alone["reduce_bucket_size"] == 10_000_000
    assert alone["contiguous_gradients"] is False
    assert train.deepspeed_config(a, trainable=1234, world_size=1)["zero_optimization"]["reduce_bucket_size"] == 1234
    several = train.deepspeed_config(a, trainable=10 ** 10, world_size=2)["zero_optimization"]
    assert several["overlap_comm"] is True and several["reduce_bucket_size"] == 500_000_000
    assert "contiguous_gradients" not in several  # DeepSpeed's default (True)
    a.deepspeed = "deepspeed_zero3"  # ZeRO-3 sizes its buckets by itself
    assert "reduce_bucket_size" not in train.deepspeed_config(a, trainable=1234)["zero_optimization"]
    a.deepspeed = "deepspeed_zero0"
    assert train.deepspeed_config(a)["zero_optimization"] == {"stage": 0}


def test_cpu_embeddings_refused_before_deepspeed_starts(tiny, tmp_path, monkeypatch):
    """A full-LLM run with --cpu-embeddings stops when the model is built, not after DeepSpeed's start-up."""
    import deepspeed

    monkeypatch.setattr(deepspeed, "initialize", lambda **kw: pytest.fail("DeepSpeed started"))
    with pytest.raises(SystemExit, match="it is trained"):
        run_inprocess(base_args(tiny, tmp_path / "run", "--llm-mode", "full", "--cpu-embeddings", "--max-steps", "1"))


def test_cpu_embeddings_only_for_a_frozen_untied_table():
    """--cpu-embeddings moves the token-embedding table off the GPU; a trained table (the optimizer holds it there)
    or one that is also the lm_head is refused with the reason."""
    cfg = dict(vocab_size=64, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    trained = SimpleNamespace(llm=llama.Llama(llama.LlamaConfig(**cfg)))
    with pytest.raises(SystemExit, match="it is trained"):
        train.check_cpu_embeddings(trained)
    tied = SimpleNamespace(llm=llama.Llama(llama.LlamaConfig(**cfg, tie_word_embeddings=True)).requires_grad_(False))
    with pytest.raises(SystemExit, match="tied weights"):
        train.check_cpu_embeddings(tied)
    train.check_cpu_embeddings(SimpleNamespace(llm=llama.Llama(llama.LlamaConfig(**cfg)).requires_grad_(False)))
    assert train.parse_args(["--stage", "finetune", "--qlora", "--llm", "x", "--vision", "y", "--data", "d",
                             "--cpu-embeddings"]).cpu_embeddings is True


def test_compile_default(tmp_path):
    """Compiled blocks by default on a GPU in every mode, except under ZeRO-3 (preset or JSON); never by default on a
    CPU; --compile / --no-compile always win. (torch.device("cuda") is only a name here: no GPU is needed.)"""
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    req = ["--llm", "x", "--data", "d.json"]
    modes = {"pretrain": ["--stage", "pretrain"], "pretrain-nf4": ["--stage", "pretrain", "--llm-mode", "frozen-nf4"],
             "finetune-full": ["--stage", "finetune"], "lora": ["--stage", "finetune", "--lora"],
             "qlora": ["--stage", "finetune", "--qlora"], "sft": ["--stage", "sft", "--lora"]}
    (tmp_path / "z3.json").write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    (tmp_path / "z2.json").write_text(json.dumps({"zero_optimization": {"overlap_comm": False}}))

    def default(mode, *extra, device=cuda):
        vision = [] if mode == "sft" else ["--vision", "y"]
        args = train.resolve_args(train.parse_args([*modes[mode], *req, *vision, *extra]), 1)
        return train.compile_default(args, device)

    for mode in modes:
        assert train.parse_args([*modes[mode], *req, *([] if mode == "sft" else ["--vision", "y"])]).compile is None
        assert (default(mode), default(mode, device=cpu)) == (True, False), mode
        assert (default(mode, "--no-compile"), default(mode, "--compile", device=cpu)) == (False, True), mode
        for zero3 in ("deepspeed_zero3", "deepspeed_zero3_offload", str(tmp_path / "z3.json")):
            assert default(mode, "--deepspeed", zero3) is False and default(mode, "--deepspeed", zero3, "--compile")
        for other in ("deepspeed_zero0", "deepspeed_zero1", "deepspeed_zero2_offload", str(tmp_path / "z2.json")):
            assert default(mode, "--deepspeed", other) is True


def test_progress_shows_the_first_compiled_step_and_its_compile_time(tmp_path, monkeypatch, capsys):
    """With compiled blocks the first step's line gives its time; once 4 more steps ran, one line says how long it
    took against the median of those (here 45 s against 2 s: 43 s). A clock stands in for time.perf_counter."""
    from extras import monitor

    def run(compiled, total, times):
        clock = iter(np.cumsum([0.0, *times]))
        monkeypatch.setattr(monitor.time, "perf_counter", lambda: next(clock))
        out = tmp_path / f"{compiled}-{total}"
        out.mkdir()
        p = monitor.Progress(out, total, 0, 1.0, torch.device("cpu"), half=False, compiled=compiled)
        recs = [p.step(i + 1, 0, 1.0, 1e-4, 0.5, 100, 1) for i in range(len(times))]
        return recs, capsys.readouterr().out.splitlines()

    recs, lines = run(True, 10, [45, 2, 3, 2, 2, 2])
    assert lines[0].endswith(" | 0.0 samples/s | 45.0 s, compiling") and lines[0].startswith("step 1/10 ")
    assert lines[1:5] == [f"step {i}/10 | loss 1.000 | lr 1.0e-04 | gnorm 0.50 | {100 / t:,.0f} tok/s | "
                          f"{1 / t:.1f} samples/s" for i, t in zip(range(2, 6), [2, 3, 2, 2])]
    assert lines[5] == ("compiling: the first step took 45.0 s, the next 4 2.0 s each (median): about 43 s of one-time "
                        "work, mostly torch.compile (--no-compile skips it)")
    assert [r["step_s"] for r in recs] == [45, 2, 3, 2, 2, 2] and recs[4]["compile_s"] == 43
    assert len(lines) == 7 and "compil" not in lines[6] and all("compile_s" not in r for r in recs[:4] + recs[5:])
    _, lines = run(True, 2, [30, 4])  # a run shorter than the window: the estimate comes at its last step
    assert lines[1].startswith("step 2/2") and lines[2].startswith("compiling: the first step took 30.0 s, the next 1 ")
    _, lines = run(False, 3, [30, 4, 4])  # without compiled blocks: nothing about compiling
    assert len(lines) == 3 and not any("compil" in ln for ln in lines)


# ----------------------------------------------------------------------------------------------------------------
# Loss normalisation: the same step whatever the micro-batch / accumulation split


def reference_step(tiny, n):
    """Loss and projector gradient of the first n samples by hand: plain PyTorch, mean over all their tokens."""
    from extras.tokenizer_files import load_tokenizer

    args = train.resolve_args(train.parse_args(base_args(tiny, "unused")), 1)
    cfg = train.model_config(args)
    m = train.build_llava(args, cfg, torch.device("cpu"))
    m.llm.activation_checkpointing = False
    ds = datasets.open_data([str(tiny["data"])], load_tokenizer(tiny["llm"]), image_folder=tiny["images"],
                        image_tokens=cfg["image_tokens"], image_size=IMAGE, image_mode="crop", log=lambda s: None)
    order = list(ShuffleSampler(len(ds), seed=args.seed))[:n]  # the samples train.py's first step sees
    total, count = 0.0, 0
    for i in order:
        b = data.collate([ds[i]], image_tokens=cfg["image_tokens"])
        s, c = m(b["input_ids"], b["labels"], b["pixel_values"])
        total, count = total + s, count + int(c)
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.projector.named_parameters()}
    return loss.item(), grads, {n: p.detach().clone() for n, p in m.projector.named_parameters()}


def test_loss_and_gradients_equal_across_splits(tiny, tmp_path, monkeypatch):
    """(micro 4, acc 1), (2, 2), (1, 4) on the same 4 samples of different lengths: the loss, the gradient the
    optimizer receives and the gradient norm equal those of one plain forward over all 4 (mean over all tokens)."""
    ref_loss, ref_grads, init = reference_step(tiny, 4)
    ref_gnorm = torch.sqrt(sum((g.double() ** 2).sum() for g in ref_grads.values())).item()
    seen = []

    class RecordingAdamW(torch.optim.AdamW):  # ZeRO-0 fp32: DeepSpeed calls our optimizer with the final grads
        def step(self, closure=None):
            seen.append([p.grad.clone() for g in self.param_groups for p in g["params"]])
            return super().step(closure)

    monkeypatch.setattr(train, "make_optimizer", lambda params, args, device, zero: RecordingAdamW(
        params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay))
    names = ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]  # parameter order
    for micro, acc in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"m{micro}"
        seen.clear()
        res = run_inprocess(base_args(tiny, out, "--micro-batch", str(micro), "--accumulation", str(acc),
                                      "--max-steps", "1", "--deepspeed", "deepspeed_zero0"))
        rec = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert rec["loss"] == pytest.approx(ref_loss, rel=1e-5) and res["losses"] == [rec["loss"]]
        assert rec["gnorm"] == pytest.approx(ref_gnorm, rel=1e-5)
        assert len(seen) == 1
        for name, g in zip(names, seen[0]):
            # fp32 sums in another order (padded batches vs one sample at a time): equal to ~1e-5 of the largest
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-5 * ref_grads[name].abs().max().item())
        w = load_file(out / "model" / "projector.safetensors")
        assert not torch.equal(w["linear_1.weight"], init["linear_1.weight"])  # the update reached the saved model


# ----------------------------------------------------------------------------------------------------------------
# Processes: train.py as the user runs it (python / torchrun), with faults injected by this runner script

RUNNER = """
import os, signal, sys
sys.path.insert(0, {root!r})
import deepspeed.comm.torch
sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # no JIT build of DeepSpeed's CPU op
import train
from extras import checkpoint, monitor

kill_at = int(os.environ.get("KILL_AT_STEP", 0))            # SIGKILL right after this optimizer step
kill_in_save = int(os.environ.get("KILL_IN_SAVE_AT_STEP", 0))  # SIGKILL inside this step's checkpoint write

step_fn = monitor.Progress.step
def step(self, step, *a, **k):
    rec = step_fn(self, step, *a, **k)
    if step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return rec
monitor.Progress.step = step

write_fn = checkpoint.write_checkpoint_files
def write(engine, folder, tag, state):
    if state["step"] == kill_in_save:
        # DeepSpeed's files are in the temporary folder, ours (trainer_state.json) not yet: the worst moment
        engine.save_checkpoint(str(folder), tag=tag, save_latest=False, exclude_frozen_parameters=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return write_fn(engine, folder, tag, state)
checkpoint.write_checkpoint_files = write

train.main(sys.argv[1:])
import torch
if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # a group of one stays for in-process callers
    assert not torch.distributed.is_initialized(), "train.main left its process group to the interpreter's exit"
"""


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner") / "run_train.py"
    path.write_text(RUNNER.format(root=str(ROOT)))
    return path


def run_process(runner, argv, nproc=1, expect_kill=False, **env):
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                           "MASTER_PORT", "LOCAL_WORLD_SIZE")}
    e.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", **{k: str(v) for k, v in env.items()})
    if nproc == 1:
        cmd = [sys.executable, str(runner), *argv]
    else:
        from conftest import free_port

        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", str(runner), *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=e, capture_output=True, text=True, timeout=300)
    if expect_kill:
        assert p.returncode == -signal.SIGKILL, p.stdout[-3000:] + p.stderr[-3000:]
    else:
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(out):
    return [json.loads(ln) for ln in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def test_two_processes_zero2_same_curve_as_one(tiny, tmp_path, runner):
    """Global batch 4 as 2 ranks x micro 2 (ZeRO-2, gloo) and as 1 rank x micro 2 x accumulation 2."""
    args = ["--micro-batch", "2", "--global-batch", "4", "--max-steps", "4", "--deepspeed", "deepspeed_zero2"]
    run_process(runner, base_args(tiny, tmp_path / "two", *args), nproc=2)
    run_process(runner, base_args(tiny, tmp_path / "one", *args))
    two, one = metrics(tmp_path / "two"), metrics(tmp_path / "one")
    assert [r["step"] for r in two] == [1, 2, 3, 4] == [r["step"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
    assert [r["gnorm"] for r in two] == pytest.approx([r["gnorm"] for r in one], rel=1e-4)
    a, b = (load_file(tmp_path / d / "model" / "projector.safetensors") for d in ("two", "one"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_a_new_run_does_not_start_in_another_runs_folder(tiny, tmp_path):
    """The same --out twice without --resume: the second run stops before it writes anything, so the first run's
    curve, checkpoints and model are kept as they were (it used to append its curve to theirs and mix its
    checkpoints in). --resume auto in a folder whose run died before its first checkpoint starts over, curve too."""
    out = tmp_path / "run"
    run_inprocess(base_args(tiny, out, "--max-steps", "1"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit, match=r"^--out .*run holds a run already \(metrics.jsonl, checkpoints, model\): "
                                         r"pass --resume to continue it"):
        run_inprocess(base_args(tiny, out, "--max-steps", "2"))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    died = tmp_path / "died"  # killed at step 3, before any checkpoint: only its curve is there
    died.mkdir()
    (died / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (1, 2, 3)))
    run_inprocess(base_args(tiny, died, "--max-steps", "2", "--resume", "auto"))
    assert [(r["step"], r["loss"] != 99.0) for r in metrics(died)] == [(1, True), (2, True)]


def test_kill_and_resume_is_exact(tiny, tmp_path, runner):
    """LoRA with dropout (the RNG matters), length-grouped sampler, 2 epochs of 4 steps, checkpoints every 3 steps.
    Killed after step 5, resumed and killed again inside the step-6 checkpoint write, resumed again: the losses and
    the final weights are bit-identical to a run never killed."""
    args = ["--stage", "finetune", "--lora", "--lora-r", "4", "--lora-dropout", "0.1", "--lr", "1e-3",
            "--micro-batch", "2", "--accumulation", "2", "--epochs", "2", "--save-steps", "3"]  # ZeRO-2: the default
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_process(runner, base_args(tiny, ref, *args))
    run_process(runner, base_args(tiny, run, *args), expect_kill=True, KILL_AT_STEP=5)
    ck = run / "checkpoints"
    assert (ck / "latest").read_text() == "step_3" and [r["step"] for r in metrics(run)] == [1, 2, 3, 4, 5]

    run_process(runner, base_args(tiny, run, *args, "--resume"), expect_kill=True, KILL_IN_SAVE_AT_STEP=6)
    assert (ck / "tmp_step_6").is_dir() and not (ck / "tmp_step_6" / "trainer_state.json").exists()
    assert (ck / "latest").read_text() == "step_3" and not (ck / "step_6").exists()  # the previous one is whole

    p = run_process(runner, base_args(tiny, run, *args, "--resume", "auto"))
    assert "resumed from" in p.stdout and "step_3" in p.stdout
    # a finetune without --init-from says that its projector starts from random weights
    assert "warning: --stage finetune without --init-from: the projector starts from random weights" in p.stdout
    got, want = metrics(run), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 9)) == [r["step"] for r in want]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]  # bit-exact on CPU fp32
    assert [r["lr"] for r in got] == [r["lr"] for r in want]
    for name in ("projector.safetensors", "llm_adapter/adapter_model.safetensors"):
        a, b = load_file(run / "model" / name), load_file(ref / "model" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert sorted(p.name for p in ck.glob("*step_*")) == ["step_6", "step_8"]  # 2 kept, no tmp left
    assert os.readlink(tmp_path / "latest") == "run/model"


# ----------------------------------------------------------------------------------------------------------------
# Bad data: training completes, every problem counted and reported


def test_bad_data_training_completes_and_reports(tiny, tmp_path, capsys):
    img = tmp_path / "images"
    img.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(img / f"good{i}.png")
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(img / "full.jpg", quality=95)
    raw = (img / "full.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(raw[: len(raw) // 2])
    (img / "not_an_image.png").write_bytes(b"these bytes are not an image\n" * 10)
    Image.new("RGB", (1, 1), (9, 9, 9)).save(img / "one.png")
    Image.new("RGB", (2000, 3), (9, 200, 9)).save(img / "strip.png")

    def rec(rid, image=None, q="<image>\nWhat is it?", a="A red thing."):
        r = {"id": rid, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
        return r if image is None else {**r, "image": image}

    records = [rec(f"good{i}", f"good{i}.png") for i in range(6)] + [
        rec("missing", "missing.png"), rec("truncated", "truncated.jpg"), rec("not_an_image", "not_an_image.png"),
        rec("one_pixel", "one.png"), rec("strip", "strip.png"),
        {"id": "no_conversations", "image": "good0.png"},
        {"id": "unknown_from", "conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]},
        rec("placeholder_without_image"),
        rec("more_placeholders", "good1.png", q="<image>\n<image>\nTwo?"),
        rec("too_long", "good2.png", q="<image>\n" + "word " * 200),
        rec("long_answer", "good3.png", a="many " * 200),
    ]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    out = tmp_path / "run"
    with pytest.warns(data.DataWarning):
        res = run_inprocess(base_args(tiny, out, "--max-length", "64", "--micro-batch", "2", "--deepspeed",
                                      "deepspeed_zero1", data=path, images=img))
    text = capsys.readouterr().out
    # 17 records: 4 bad + 1 too long dropped, 1 truncated inside its answer, 12 samples; 3 images fail at load time
    assert "17 records -> 12 samples | dropped 5 (4 bad, 1 too long, 0 with nothing supervised) | truncated 1" in text
    assert res["report"] in text and "3 records skipped because their image failed to load" in text
    assert [rid for _, rid in res["unreadable"]] == ["missing", "not_an_image", "truncated"]
    assert [r["step"] for r in metrics(out)] == list(range(1, 7)) and all(np.isfinite(res["losses"]))
    assert (out / "model" / "projector.safetensors").exists()
    # every dropped record, one JSON object each, where it is and why; the summary points there
    bad = [json.loads(ln) for ln in (out / "bad_records.jsonl").read_text().splitlines()]
    assert [b["id"] for b in bad] == ["no_conversations", "unknown_from", "placeholder_without_image",
                                      "more_placeholders", "too_long"]
    assert all(b["file"] == str(path) and b["reason"] for b in bad) and [b["index"] for b in bad] == [11, 12, 13, 14, 15]
    assert f"all 5 dropped records, each with its reason: {out}/bad_records.jsonl" in text


def test_sft_names_an_image_record_in_a_mix(tiny, tmp_path):
    """--stage sft over several --data (a mix), one of them with images: stopped, the first such record named."""
    from extras.train_data import open_dataset
    from extras.tokenizer_files import load_tokenizer

    msgs = [{"id": f"m{i}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
            for i in range(2)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    (tmp_path / "run").mkdir()
    args = train.resolve_args(train.parse_args(["--stage", "sft", "--llm", str(tiny["llm"]), "--lora", "--data",
                                                str(tmp_path / "m.jsonl"), "--data", f"{tiny['data']}:{tiny['images']}",
                                                "--out", str(tmp_path / "run")]), 1)
    with pytest.raises(SystemExit, match=r"16 of the 18 samples .* have an image \(the first: r0\)"):
        open_dataset(args, load_tokenizer(tiny["llm"]), train.model_config(args))


def test_unreadable_data_stops_with_the_file_and_reason(tiny, tmp_path):
    """A --data that cannot be read at all (missing, broken JSON, an object that is no mix) stops the run with one line that names
    the file and what is wrong with it, not a traceback; nothing is trained."""
    (tmp_path / "broken.json").write_text('[{"id": "a"},\n {"id": }]')
    (tmp_path / "dict.json").write_text('{"id": "a"}')
    for name, reason in (("missing.json", "no records file at"), ("broken.json", "invalid JSON at line 2"),
                         ("dict.json", "a mix file holds")):  # a JSON object is read as a mix file
        out = tmp_path / name.split(".")[0]
        with pytest.raises(SystemExit, match=f"^--data: .*{name}.*{reason}|^--data: {reason}.*{name}"):
            run_inprocess(base_args(tiny, out, "--max-steps", "1", data=tmp_path / name))
        assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("workers", ["0", "1"])
def test_an_image_folder_without_the_images_stops_with_one_line(tiny, tmp_path, workers):
    """Every image unreadable (a folder that exists but is the wrong one): the run stops at its first step with the
    dataset's reason on one line, also when a DataLoader worker process raised it."""
    (tmp_path / "empty").mkdir()
    argv = base_args(tiny, tmp_path / "run", "--max-steps", "1", "--num-workers", workers, images=tmp_path / "empty")
    with pytest.warns(data.DataWarning) if workers == "0" else contextlib.nullcontext():
        with pytest.raises(SystemExit, match=r"^--data: 16 samples from sample \d+ of .*train.json could not load "
                                             r"their image \(last: .*\); is the image folder .*empty right\?$"):
            run_inprocess(argv)


@pytest.mark.parametrize("flags, message", [
    (["--image-folder", "{nope}"], r"^--data: image folder .*nope \(for .*\): no such folder"),
    (["--init-from", "{nope}"], r"^--init-from .*nope: no such file or folder"),
    (["--eval-image", "{nope}"], r"^--eval-image .*nope: no such file or folder"),
    (["--template", "nope"], r"^--template nope: no such template; give one of .*llama3_chat"),
    (["--select-layer", "5"], r"^--select-layer 5: out of range for the 2-layer CLIP in .*vision \(from -3 to 2;"),
    (["--select-layer", "-4"], r"^--select-layer -4: out of range for the 2-layer CLIP"),
    (["--eval-image", "{data}"], r"^--eval-image: cannot read image .*train.json"),
    (["--init-from", "{data}"], r"^--init-from .*train.json: no projector could be read there \(.*\); give a stage-1"),
    (["--init-from", "{images}"], r"^--init-from .*images: no projector could be read there \(.*\); give a stage-1")])
def test_a_wrong_setting_stops_before_training(tiny, tmp_path, flags, message):
    """A path the run reads later (the image folder, the stage-1 projector, the eval picture) that is not there or
    holds the wrong thing, an unknown template, a CLIP layer the tower does not have: stopped at once with the flag
    named, instead of a traceback after the data pass, at the first eval or step, or every image failing. (A flag
    given again overrides base_args' value: argparse keeps the last.)"""
    flags = [f.format(data=tiny["data"], images=tiny["images"], nope=tmp_path / "nope") for f in flags]
    with pytest.raises(SystemExit, match=message):
        run_inprocess(base_args(tiny, tmp_path / "run", "--max-steps", "1", *flags))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_select_layer_at_either_end_of_the_range_trains(tiny, tmp_path):
    for layer in ("-3", "2"):  # a 2-layer CLIP: its embeddings and its last block
        res = run_inprocess(base_args(tiny, tmp_path / f"run{layer}", "--max-steps", "1", "--select-layer", layer))
        assert len(res["losses"]) == 1 and math.isfinite(res["losses"][0])


def test_every_bad_record_is_listed(tiny, tmp_path):
    """More bad records than the log shows (5): bad_records.jsonl holds all of them, the data report counts them all
    and names the file."""
    from extras.train_data import data_report, make_sampler, open_dataset
    from extras.tokenizer_files import load_tokenizer

    records = [{"id": f"bad{i}", "conversations": [{"from": "robot", "value": "?"}]} for i in range(8)]
    records += [{"id": f"good{i}", "image": "0.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]} for i in range(4)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    args = train.resolve_args(train.parse_args(base_args(tiny, tmp_path / "run", data=tmp_path / "d.json")), 1)
    (tmp_path / "run").mkdir()
    ds = open_dataset(args, load_tokenizer(tiny["llm"]), train.model_config(args))
    bad = [json.loads(ln) for ln in (tmp_path / "run" / "bad_records.jsonl").read_text().splitlines()]
    assert [b["id"] for b in bad] == [f"bad{i}" for i in range(8)] and len(ds) == 4
    assert all("unknown 'from'" in b["reason"] and b["line"] > 0 for b in bad)
    report = data_report(ds, make_sampler(args, ds), tmp_path / "run")
    assert "12 records -> 4 samples | dropped 8 (8 bad, " in report
    assert report.endswith(f"| all 8 dropped records, each with its reason: {tmp_path / 'run'}/bad_records.jsonl")


# ----------------------------------------------------------------------------------------------------------------
# Progress line, eval prompts, stage output, plot


def test_progress_eval_output_and_plot(tiny, tmp_path, capsys):
    import re

    out = tmp_path / "runs" / "p"
    res = run_inprocess(base_args(tiny, out, "--micro-batch", "4", "--max-steps", "2", "--eval-image",
                                  str(tiny["images"] / "0.png"), "--eval-every", "1", "--eval-prompt", "What is it?",
                                  "--eval-max-new-tokens", "3"))
    text = capsys.readouterr().out
    assert f"curves: python tools/plot.py {out}" in text and "without --init-from" not in text
    lines = [ln for ln in text.splitlines() if ln.startswith("step ")]
    assert len(lines) == 2
    for ln in lines:  # mfu and mem appear only on a GPU whose peak is known
        assert re.fullmatch(r"step \d/2 \| loss \d+\.\d{3} \| lr \d\.\de[-+]\d\d \| gnorm \d+\.\d\d \| [\d,]+ tok/s"
                            r" \| \d+\.\d samples/s", ln), ln
    rec = metrics(out)[0]
    assert {"step", "loss", "lr", "gnorm", "tok_s", "samples_s"} <= rec.keys() and rec["loss"] == res["losses"][0]
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_0.txt", "step_1.txt", "step_2.txt"]
    assert (out / "eval" / "step_2.txt").read_text().startswith("[What is it?]\n")
    assert "vision" in text and "projector" in text and "global batch 4" in text  # the start summary
    cfg = json.loads((out / "model" / "llava.json").read_text())
    assert (cfg["llm"], cfg["image_mode"], cfg["image_tokens"], cfg["llm_mode"]) == (str(tiny["llm"]), "crop", 16,
                                                                                      "frozen")
    assert os.readlink(tmp_path / "runs" / "latest") == "p/model"
    m, _, _ = loader.load_model(tmp_path / "runs" / "latest", dtype=torch.float32)  # what chat / eval read
    saved = load_file(out / "model" / "projector.safetensors")
    assert torch.equal(m.projector.linear_2.bias, saved["linear_2.bias"])
    from tools import plot

    plot.main([str(out)])
    png = Image.open(out / "metrics.png")
    assert png.size == (900, 640) and len(png.getcolors(1 << 16)) > 2  # white, black and the curves


def test_text_only_run_answers_eval_prompts_as_text(tiny, tmp_path, capsys):
    """--stage sft with --eval-prompt: the prompts are answered as text at the start, every --eval-every steps and at
    the end (no image); without --eval-prompt nothing is evaluated (XTuner's default prompts ask about a picture)."""
    msgs = [{"id": f"m{i}", "messages": [{"role": "user", "content": "say hi"},
                                         {"role": "assistant", "content": " ".join(WORDS[: 2 + i])}]} for i in range(4)]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
    common = ["--stage", "sft", "--llm", str(tiny["llm"]), "--data", str(tmp_path / "m.jsonl"), "--lora", "--lora-r",
              "2", "--dtype", "fp32", "--num-workers", "0", "--micro-batch", "2", "--max-steps", "2"]
    out = tmp_path / "runs" / "sft"
    run_inprocess([*common, "--out", str(out), "--eval-prompt", "say hi", "--eval-every", "1",
                   "--eval-max-new-tokens", "3"])
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["step_0.txt", "step_1.txt", "step_2.txt"]
    assert (out / "eval" / "step_2.txt").read_text().startswith("[say hi]\n")
    assert "--- eval at step 0 ---" in capsys.readouterr().out
    quiet = tmp_path / "runs" / "quiet"
    run_inprocess([*common, "--out", str(quiet)])
    assert not (quiet / "eval").exists() and "--- eval at" not in capsys.readouterr().out
    with pytest.raises(SystemExit):  # an image is still not for a text-only run
        train.parse_args([*common, "--eval-image", str(tiny["images"] / "0.png")])
