"""--dtype fp16 on CPU: DeepSpeed's dynamic loss scaling (its own scaler and overflow check, not a copy of ours) in
every training mode, and a step whose gradients overflow skipped with the weights untouched and the scale lowered.

The reference for the scale is DeepSpeed's DynamicLossScaler, driven by the same overflow sequence and the settings
train.deepspeed_config writes; the reference for a skipped step is the weights before it.
"""
import json
import math

import numpy as np
import pytest
import torch

import train
from test_train import WORDS, base_args, metrics, run_inprocess, write_records, write_tiny_models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):  # test_train's tiny models and 16 image records
    root = tmp_path_factory.mktemp("tiny")
    llm, vision = write_tiny_models(root)
    return {"root": root, "llm": llm, "vision": vision, "data": write_records(root, 16), "images": root / "images"}


@pytest.fixture(autouse=True)
def fp16_on_any_cpu(monkeypatch):
    """DeepSpeed's CPU accelerator admits fp16 only where oneDNN has fp16 kernels (CPUs with AVX512-FP16 or
    AMX-FP16); torch computes fp16 on any CPU, and the loss scaling under test does not depend on the device."""
    from deepspeed.accelerator.cpu_accelerator import CPU_Accelerator

    monkeypatch.setattr(CPU_Accelerator, "is_fp16_supported", lambda self: True)


def test_fp16_config_and_zero0_refused():
    req = ["--stage", "finetune", "--lora", "--llm", "x", "--vision", "y", "--data", "d.json", "--dtype", "fp16"]
    cfg = train.deepspeed_config(train.resolve_args(train.parse_args(req), 1))
    assert cfg["bf16"] == {"enabled": False}
    assert cfg["fp16"]["enabled"] is True and cfg["fp16"]["loss_scale"] == 0  # 0: dynamic
    bf16 = train.resolve_args(train.parse_args(req[:-1] + ["bf16"]), 1)
    assert train.deepspeed_config(bf16)["fp16"]["enabled"] is False
    # DeepSpeed 0.19 under ZeRO-0 divides fp16 gradients by a loss scale it never multiplied in: refused, named
    with pytest.raises(SystemExit, match=r"--dtype fp16 with ZeRO-0 \(deepspeed_zero0\).*deepspeed_zero2"):
        train.deepspeed_config(train.resolve_args(train.parse_args(req + ["--deepspeed", "deepspeed_zero0"]), 1))


def inject_overflow(monkeypatch, inject):
    """Wrap train.train_step: at the optimizer steps in `inject` (counted as DeepSpeed counts them, so across a
    resume) a gradient of the projector is inf. Returns the list each step appends to: applied, the dtype of the
    weights, and whether each projector weight changed."""
    seen = []
    real_step = train.train_step

    def step(engine, micro, device):
        proj = engine.module.projector
        before = [p.detach().clone() for p in proj.parameters()]
        hook = None
        if engine.global_steps + 1 in inject:
            hook = proj.linear_2.bias.register_hook(lambda g: torch.full_like(g, math.inf))
        out = real_step(engine, micro, device)
        if hook is not None:
            hook.remove()
        seen.append({"applied": engine.was_step_applied(), "dtype": before[0].dtype,
                     "changed": [not torch.equal(a, b) for a, b in zip(before, proj.parameters())]})
        return out

    monkeypatch.setattr(train, "train_step", step)
    return seen


def test_overflow_skips_the_step_and_lowers_the_scale(tiny, tmp_path, monkeypatch):
    """6 steps of ZeRO-2 fp16; an inf is injected into a projector gradient at steps 2 and 3. Those steps are
    skipped (weights bit-identical, lr schedule held), the others apply, and the loss scale of every step is the one
    DeepSpeed's DynamicLossScaler gives for that overflow sequence: with hysteresis 2 the second overflow halves it."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    inject, steps = {2, 3}, 6
    seen = inject_overflow(monkeypatch, inject)
    out = tmp_path / "run"
    argv = base_args(tiny, out, "--dtype", "fp16", "--micro-batch", "2", "--max-steps", str(steps), "--lr", "1e-3")
    res = run_inprocess(argv)
    recs = metrics(out)
    assert [r["step"] for r in recs] == list(range(1, steps + 1)) and all(np.isfinite(res["losses"]))
    skipped = [n in inject for n in range(1, steps + 1)]
    assert [r.get("skipped", False) for r in recs] == skipped == [not s["applied"] for s in seen]
    assert all(s["dtype"] == torch.float16 for s in seen)
    for s, skip in zip(seen, skipped):  # a skipped step leaves every weight as it was; an applied one moves them
        assert s["changed"] == [not skip] * 4
    assert res["engine"].skipped_steps == len(inject)

    fp16 = train.deepspeed_config(train.resolve_args(train.parse_args(argv), 1))["fp16"]
    ref = DynamicLossScaler(init_scale=2 ** fp16["initial_scale_power"], scale_window=fp16["loss_scale_window"],
                            min_scale=fp16["min_loss_scale"], delayed_shift=fp16["hysteresis"],
                            consecutive_hysteresis=False)
    want = []
    for skip in skipped:
        want.append(ref.cur_scale)
        ref.update_scale(skip)
    assert [r["loss_scale"] for r in recs] == want
    assert want[:4] == [65536, 65536, 65536, 32768]  # the second overflow in a row halved it

    # DeepSpeed does not advance the lr scheduler on a skipped step: each step uses the lr of the applied count
    applied = np.cumsum([0] + [not s for s in skipped])[:-1]
    assert [r["lr"] for r in recs] == pytest.approx([1e-3 * train.lr_factor(a, steps) for a in applied])


MODES = {
    "pretrain": ["--stage", "pretrain"],
    "finetune-full": ["--stage", "finetune", "--llm-mode", "full"],
    "finetune-lora": ["--stage", "finetune", "--lora", "--lora-r", "4"],
    "finetune-qlora": ["--stage", "finetune", "--qlora", "--lora-r", "4"],
    "sft-lora": ["--stage", "sft", "--lora", "--lora-r", "4"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_trains_in_fp16(mode, tiny, tmp_path, monkeypatch):
    """Each training mode under --dtype fp16: fp16 weights (NF4 stays 4-bit, its compute dtype fp16), finite losses,
    a loss scale on every step, the trained weights moved, and a model/ that says float16."""
    out = tmp_path / "run"
    argv = base_args(tiny, out, "--dtype", "fp16", "--micro-batch", "2", "--max-steps", "3", "--lr", "1e-3")
    argv += MODES[mode]
    if mode.startswith("sft"):
        msgs = [{"id": f"m{i}", "messages": [{"role": "user", "content": "say hi"},
                                             {"role": "assistant", "content": " ".join(WORDS[: 2 + i])}]}
                for i in range(8)]
        (tmp_path / "m.jsonl").write_text("".join(json.dumps(m) + "\n" for m in msgs))
        drop = {"--vision", "--image-folder", "--data"}  # each with its value: a text-only run
        argv = [a for i, a in enumerate(argv) if a not in drop and argv[i - 1] not in drop]
        argv += ["--data", str(tmp_path / "m.jsonl")]
    initial = {}
    real_build = train.build_llava

    def build(*a, **k):
        m = real_build(*a, **k)
        initial.update({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
        return m

    monkeypatch.setattr(train, "build_llava", build)
    res = run_inprocess(argv)
    m = res["engine"].module
    recs = metrics(out)
    assert len(recs) == 3 and all(np.isfinite(res["losses"])) and all(r["loss_scale"] >= 1 for r in recs)
    assert any(not r.get("skipped") for r in recs)
    trained = {n: p for n, p in m.named_parameters() if p.requires_grad}
    assert trained.keys() == initial.keys() and all(p.dtype == torch.float16 for p in trained.values())
    assert any(not torch.equal(trained[n], initial[n].to(trained[n].device)) for n in trained)
    if mode.endswith("qlora"):
        q = m.llm.layers[0].self_attn.q_proj
        assert q.weight.dtype == torch.uint8 and q.compute_dtype == torch.float16
    assert json.loads((out / "model" / "llava.json").read_text())["dtype"] == "float16"


def test_resume_after_a_skipped_step_keeps_the_schedule(tiny, tmp_path, monkeypatch):
    """A run whose step 2 overflowed, checkpointed at step 3 and stopped during step 4, resumes with the lr, loss
    scale and losses of the run never stopped (the resumed schedule counts only the applied steps, as DeepSpeed's
    scheduler did before the stop)."""
    from extras import monitor

    inject_overflow(monkeypatch, {2})
    argv = ["--dtype", "fp16", "--micro-batch", "2", "--max-steps", "5", "--lr", "1e-3", "--save-steps", "3"]
    run_inprocess(base_args(tiny, tmp_path / "ref", *argv))

    class Stop(Exception):
        pass

    real = monitor.Progress.step

    def stop_at_4(self, step, *a, **k):
        rec = real(self, step, *a, **k)
        if step == 4:
            raise Stop
        return rec

    monkeypatch.setattr(monitor.Progress, "step", stop_at_4)
    with pytest.raises(Stop):
        run_inprocess(base_args(tiny, tmp_path / "run", *argv))
    monkeypatch.setattr(monitor.Progress, "step", real)
    run_inprocess(base_args(tiny, tmp_path / "run", *argv, "--resume", "auto"))
    got, want = metrics(tmp_path / "run"), metrics(tmp_path / "ref")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5] and [r.get("skipped", False) for r in want] == [
        False, True, False, False, False]
    for k in ("lr", "loss_scale", "loss"):
        assert [r[k] for r in got] == pytest.approx([r[k] for r in want], rel=1e-6), k
