"""A train.py run folder on disk: creating it (args.json), the projector it starts from (--init-from), checkpoints
(save, find, resume), the stage output model/ with runs/latest, and `export`, which turns any checkpoint into a
model/ folder.

    RUN/checkpoints/step_N/     DeepSpeed's files (trainable weights, optimizer, scheduler), rng_rank{R}.pt per rank,
                                trainer_state.json (step, epoch, samples consumed, world size, the flags, llava.json)
    RUN/checkpoints/latest      the tag of the newest complete checkpoint (DeepSpeed's own pointer-file name)
    RUN/model/                  extras.loader.save_model's folder: what chat, eval_mmbench and convert read
    RUNS/latest -> RUN/model    a relative symlink

A checkpoint is written under a temporary name (tmp_step_N), and trainer_state.json comes last: its presence marks
the folder complete. Only then is it renamed and pointed at, so a kill at any moment leaves the previous checkpoint
whole. Only the trainable weights are saved: the frozen ones are in the base model files already.

The run's model is rebuilt here from llava.json alone (add_trainable_parts, empty_model), so that `export` needs
neither train.py nor a base weight: train.py builds its model with the same add_trainable_parts.
"""

import json
import os
import random
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

import clip
import data
import llama
import lora
from extras import loader
from extras.distributed import barrier, broadcast, log, rank, world
from extras.xtuner import safe_torch_load
from model import LLM_LORA_TARGETS, VISION_LORA_TARGETS, LLaVA, Projector
from weights import CheckpointError, atomic_write, load_with_table, read_json, write_json

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}  # train.py --dtype

# ----------------------------------------------------------------------------------------------------------------
# The run's model: llava.json from the flags, and back


def add_trainable_parts(m, cfg):
    """Unfreeze what llava.json says trains (on a model whose parameters are all frozen): the projector (if any),
    the whole LLM (llm_mode full) and the LoRA adapters it lists."""
    if cfg["llm_mode"] == "full":
        m.llm.requires_grad_(True)
    if cfg["llm_lora"]:
        c = cfg["llm_lora"]
        lora.inject_lora(m.llm, c["targets"], c["r"], c["alpha"], c["dropout"])
    if cfg["vision_lora"]:
        c = cfg["vision_lora"]
        lora.inject_lora(m.vision, c["targets"], c["r"], c["alpha"], c["dropout"])
    if m.projector is not None:
        m.projector.requires_grad_(True)


def model_config(args):
    """llava.json for train.py's flags (extras.loader.save_model writes it, load_model reads it), sizes read from
    the config.json of --llm and --vision. A text-only run (sft) says "vision": None and "projector": None: its model/
    is the LLM's adapter (or full weights) alone. A path the run reads that is not there (--llm, --vision,
    --init-from, --eval-image), an --init-from without a projector, an eval image that does not open, an unknown
    --template or a --select-layer the CLIP does not have stops it here, before the long pass over the data."""
    def read(path, cls, flag):
        if not (Path(path) / "config.json").is_file():
            raise SystemExit(f"{flag} {path}: no config.json there (give the folder of an HF checkpoint)")
        return cls.from_hf_config(read_json(Path(path) / "config.json"))

    for flag, path in (("--init-from", args.init_from), ("--eval-image", args.eval_image)):  # before the data pass
        if path and not Path(path).exists():
            raise SystemExit(f"{flag} {path}: no such file or folder")
    if args.init_from:  # read here and again when the model is built: a wrong file costs seconds, not the data pass
        try:
            loader.read_projector(args.init_from)
        except Exception as e:  # the layouts it reads fail in many ways (a pickle, a folder, missing keys)
            raise SystemExit(f"--init-from {args.init_from}: no projector could be read there ({type(e).__name__}: "
                             f"{e}); give a stage-1 run's folder or model/, or XTuner's iter_N.pth") from None
    if args.template not in data.TEMPLATES:
        raise SystemExit(f"--template {args.template}: no such template; give one of {', '.join(data.TEMPLATES)}")
    if args.eval_image:
        try:
            clip.load_image(args.eval_image)
        except clip.ImageError as e:
            raise SystemExit(f"--eval-image: {e}") from None
    vcfg = None if args.vision is None else read(args.vision, clip.CLIPConfig, "--vision")
    if vcfg and not -vcfg.num_layers - 1 <= args.select_layer <= vcfg.num_layers:  # CLIP's hidden_states indices
        raise SystemExit(f"--select-layer {args.select_layer}: out of range for the {vcfg.num_layers}-layer CLIP "
                         f"in {args.vision} (from {-vcfg.num_layers - 1} to {vcfg.num_layers}; LLaVA's is -2)")
    lcfg = read(args.llm, llama.LlamaConfig, "--llm")
    lora_cfg = lambda r, a, d, t: {"r": r, "alpha": a, "dropout": d, "targets": list(t)}  # noqa: E731
    llm_lora = lora_cfg(args.lora_r, args.lora_alpha, args.lora_dropout, LLM_LORA_TARGETS)
    cfg = {"llm": str(args.llm), "vision": None, "projector": None, "template": args.template, "image_tokens": 0,
           "llm_mode": args.llm_mode, "llm_lora": llm_lora if args.llm_mode in ("lora", "qlora") else None,
           "vision_lora": None, "dtype": str(TORCH_DTYPES[args.dtype]).removeprefix("torch.")}
    if vcfg:  # LLaVA: the vision tower, how images enter it, the projector to the LLM
        cfg.update(vision=str(args.vision), select_layer=args.select_layer, image_mode=args.image_mode,
                   image_size=vcfg.image_size, image_tokens=vcfg.num_patches,
                   projector={"in": vcfg.hidden_size, "hidden": lcfg.hidden_size, "out": lcfg.hidden_size},
                   vision_lora=lora_cfg(args.vision_lora_r, args.vision_lora_alpha, args.vision_lora_dropout,
                                        VISION_LORA_TARGETS) if args.vision_lora else None)
    return cfg


def empty_model(cfg, dtype, device):
    """The base CLIP, projector and LLM of the shapes in the config.json files llava.json names, without reading a
    weight: on the meta device (shapes only, no memory) for export; elsewhere with the constructors' random weights
    (Llama: HF's N(0, 0.02)), built on `device` in `dtype` directly, so an 8B model needs no fp32 copy (bench/)."""
    def config(cls, path):
        return cls.from_hf_config(read_json(Path(path) / "config.json"))

    lcfg = config(llama.LlamaConfig, cfg["llm"])
    vcfg = None if cfg["vision"] is None else config(clip.CLIPConfig, cfg["vision"])
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the training dtype (RoPE frequencies stay fp32)
    try:
        with torch.device(device):
            if vcfg is None:  # a text-only run
                return LLaVA(None, None, llama.Llama(lcfg))
            p = cfg["projector"]
            return LLaVA(clip.CLIPVisionTower(vcfg), Projector(p["in"], p["out"], p["hidden"]), llama.Llama(lcfg),
                         cfg.get("select_layer", -2))
    finally:
        torch.set_default_dtype(old)


def load_projector(projector, path):
    """--init-from: the projector of a previous stage (our run, XTuner's folder or iter_N.pth), checked key by key."""
    try:
        load_with_table(projector, loader.read_projector(path), loader.PROJECTOR_KEYS,
                        device=projector.linear_1.weight.device)
    except CheckpointError as e:
        raise SystemExit(f"--init-from {path}: its projector does not fit this model (trained with another LLM or "
                         f"vision tower?): {e}") from None
    log(f"projector initialised from {path}")


# ----------------------------------------------------------------------------------------------------------------
# Saving a checkpoint


def rng_state():
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_checkpoint_files(engine, folder, tag, trainer_state):
    """Everything a checkpoint holds, written into folder/tag (a temporary name until save_checkpoint renames it).
    trainer_state.json comes last: its presence marks the folder complete."""
    # frozen weights are in the base model files already; QLoRA's NF4 ones could not be reloaded strictly anyway
    engine.save_checkpoint(str(folder), tag=tag, save_latest=False, exclude_frozen_parameters=True)
    torch.save(rng_state(), folder / tag / f"rng_rank{rank()}.pt")
    barrier()
    if rank() == 0:
        write_json(folder / tag / "trainer_state.json", trainer_state)
    barrier()


def save_checkpoint(engine, out, trainer_state, keep):
    """out/checkpoints/step_N from every rank, then "latest" names it; only the newest `keep` are kept."""
    folder = Path(out) / "checkpoints"
    step = trainer_state["step"]
    tag, tmp = f"step_{step}", f"tmp_step_{step}"
    if (folder / tag / "trainer_state.json").exists():
        return  # a resumed run that ends where it resumed: this very state is saved already
    if rank() == 0 and (folder / tmp).exists():
        shutil.rmtree(folder / tmp)
    barrier()
    write_checkpoint_files(engine, folder, tmp, trainer_state)
    if rank() == 0:
        if (folder / tag).exists():  # an incomplete folder of that name (never pointed at): replace it
            shutil.rmtree(folder / tag)
        os.replace(folder / tmp, folder / tag)
        with atomic_write(folder / "latest") as f:
            f.write_text(tag)
        steps = sorted(int(p.name[5:]) for p in folder.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(folder / f"step_{old}", ignore_errors=True)
        for stale in folder.glob("tmp_step_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    barrier()


# ----------------------------------------------------------------------------------------------------------------
# Finding and loading one


def find_checkpoint(resume, out):
    """(checkpoints folder, tag) to resume from, or None. `resume` is "auto" (the newest complete checkpoint of out),
    a run folder, or one checkpoint folder."""
    path = Path(out if resume == "auto" else resume)
    if (path / "trainer_state.json").exists():
        return path.parent, path.name
    folder = path / "checkpoints"
    complete = lambda tag: (folder / tag / "trainer_state.json").exists()  # noqa: E731
    pointer = folder / "latest"
    if pointer.exists() and complete(pointer.read_text().strip()):
        return folder, pointer.read_text().strip()
    tags = sorted((p.name for p in folder.glob("step_*") if complete(p.name)), key=lambda t: int(t[5:]))
    if tags:
        return folder, tags[-1]
    if resume != "auto":
        raise SystemExit(f"--resume {resume}: no complete checkpoint there (expected "
                         f"{folder}/step_N/trainer_state.json)")
    return None


def resume_point(resume, out):
    """(run folder, checkpoint or None) for `--resume RESUME [--out OUT]`: without --out, the run folder is the one
    RESUME names (a run folder, or RUN/checkpoints/step_N)."""
    if out is None and resume == "auto":
        raise SystemExit("--resume auto continues the run in --out: give --out RUN_DIR")
    if out is None:
        given = Path(resume)
        out = str(given.parent.parent if (given / "trainer_state.json").exists() else given)
    found = find_checkpoint(resume, out)
    if found is None:
        log(f"--resume auto: no complete checkpoint in {out}/checkpoints yet; starting from scratch")
    return out, found


RUN_FILES = ("metrics.jsonl", "checkpoints", "model")  # what a started run leaves in its folder


def open_run_folder(args):
    """The run folder: --out, else the one --resume names, else runs/<stage>-<date-time>; created, with args.json in
    it. Returns (folder, the checkpoint to resume from or None). A new run (no --resume) does not start in a folder
    that holds another run: its curve would be appended to that run's and its checkpoints mixed in with them."""
    resume = None
    if args.resume:
        args.out, resume = resume_point(args.resume, args.out)
    args.out = broadcast(args.out or f"runs/{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out)
    if not args.resume:
        held = broadcast([name for name in RUN_FILES if (out / name).exists()] if rank() == 0 else [])
        if held:
            raise SystemExit(f"--out {out} holds a run already ({', '.join(held)}): pass --resume to continue it, or "
                             "give a new --out (or remove that folder) to start over")
    elif resume is None:  # --resume auto before the first checkpoint: the curve starts over too
        truncate_metrics(out, 0)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "args.json", vars(args))
    barrier()
    return out, resume


def check_trainable(state, params, trainable, where, hint):
    """Stop unless `state` holds every trainable weight with the shape the model has (names them if not)."""
    missing = [n for n in trainable if n not in state]
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in trainable
             if n in state and state[n].shape != params[n].shape]
    if missing or wrong:
        raise SystemExit(f"{where} does not hold this run's trainable weights ({hint}): missing {missing[:10]} "
                         f"({len(missing)} in all), wrong shapes {wrong[:10]}")


def load_checkpoint(engine, folder, tag):
    """Restore weights, optimizer, scheduler (DeepSpeed) and the RNG states; returns trainer_state.json. Only
    trainable weights were saved, so we load them ourselves and check that every one of them was in the file
    (DeepSpeed's strict load would fail on the missing frozen ones and on bitsandbytes' extra NF4 keys)."""
    state = read_json(folder / tag / "trainer_state.json")
    if state.get("world", world()) != world():
        raise SystemExit(f"checkpoint {folder / tag} was written by {state['world']} processes, this run has "
                         f"{world()}: resume with {state['world']} (the optimizer states are split per process, and "
                         f"each process resumes at its own place in the data)")
    trainable = [n for n, p in engine.module.named_parameters() if p.requires_grad]

    def load_trainable(src, dst):
        if engine.zero_optimization_stage() == 3:
            return  # ZeRO-3 saves placeholders here and restores the weights from its optimizer shards
        params = dict(dst.named_parameters())
        check_trainable(src, params, trainable, f"checkpoint {folder / tag}",
                        "was it written with other --llm-mode / LoRA flags?")
        with torch.no_grad():
            for n in trainable:
                params[n].copy_(src[n])

    path, _ = engine.load_checkpoint(str(folder), tag=tag, load_module_strict=False, custom_load_fn=load_trainable)
    if path is None:
        raise SystemExit(f"DeepSpeed could not load the checkpoint {folder / tag}")
    rng_file = folder / tag / f"rng_rank{rank()}.pt"
    if rng_file.exists():
        set_rng_state(torch.load(rng_file, weights_only=True))
    else:
        log(f"note: {rng_file} is absent (different number of processes?); RNG streams start fresh")
    return state


def resume_training(engine, scheduler, resume, args, out):
    """Load checkpoint `resume` = (folder, tag) and put the run back where it stopped: the learning rate, and
    metrics.jsonl cut at the checkpoint's step. Returns (step, epoch, samples of the epoch consumed by this rank)."""
    state = load_checkpoint(engine, *resume)
    step = state["step"]
    # recompute this step's lr from the schedule: it differs from the saved one if --max-steps / --epochs changed;
    # steps skipped on an inf/nan gradient (fp16 overflows) did not advance it (DeepSpeed restores their count)
    scheduler.last_epoch = step - engine.skipped_steps - 1
    scheduler.step()
    for k in ("micro_batch", "accumulation", "global_batch", "seed", "max_length", "data"):
        if state["args"].get(k) != getattr(args, k):
            log(f"warning: --{k.replace('_', '-')} was {state['args'].get(k)} in the checkpoint, now "
                f"{getattr(args, k)}: the resumed run will not see the data in the same order")
    truncate_metrics(out, step)
    log(f"resumed from {resume[0] / resume[1]} at step {step} (epoch {state['epoch']}, {state['consumed']} samples "
        f"into it)")
    return step, state["epoch"], state["consumed"]


def truncate_metrics(out, step):
    """Drop metrics.jsonl records past `step` (written by a run killed after its last checkpoint)."""
    f = Path(out) / "metrics.jsonl"
    if rank() == 0 and f.exists():
        keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        with atomic_write(f) as tmp:
            tmp.write_text("".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------------------------
# Stage output: out/model/, and runs/latest -> it


def save_stage_output(engine, cfg, out):
    """extras.loader.save_model on rank 0; under ZeRO-3 the saved weights are gathered from every rank first."""
    m = engine.module
    gather = nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        saved = [p for n, p in m.named_parameters()
                 if n.startswith("projector.") or ".lora_" in n or (cfg["llm_mode"] == "full" and n.startswith("llm."))]
        gather = deepspeed.zero.GatheredParameters(saved, modifier_rank=None)
    with gather:
        if rank() == 0:
            folder, tmp = Path(out) / "model", Path(out) / "model.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            loader.save_model(m, tmp, cfg)
            if folder.exists():  # os.replace cannot replace a folder that holds files
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            link_latest(folder)
    barrier()


def link_latest(model_dir):
    """<runs>/latest -> <run>/model, a relative symlink replaced atomically (renamed over the old link)."""
    model_dir = Path(model_dir).absolute()
    runs = model_dir.parent.parent
    with atomic_write(runs / "latest") as tmp:
        os.symlink(os.path.relpath(model_dir, runs), tmp)


# ----------------------------------------------------------------------------------------------------------------
# `python train.py export CHECKPOINT [OUT]`


def read_trainable(folder):
    """{name: tensor} of the trainable weights in checkpoint `folder`, whatever the ZeRO stage and process count.

    With ZeRO 1-3 the trainable weights live as fp32 partitions of the optimizer, one file per rank (ZeRO-3's model
    files hold only placeholders); DeepSpeed's zero_to_fp32 reassembles them. Without ZeRO the model-states file
    holds them whole; it is read with a restricted unpickler, which builds tensors and nothing else."""
    if list(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name,
                                                        exclude_frozen_parameters=True)
    states = folder / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise SystemExit(f"{folder}: neither ZeRO optimizer partitions nor mp_rank_00_model_states.pt: not a "
                         f"DeepSpeed checkpoint of train.py")
    return safe_torch_load(states)["module"]


def export_checkpoint(checkpoint, out=None):
    """The model/ folder (chat, eval_mmbench and convert read it) of a checkpoint folder (RUN/checkpoints/step_N, or
    a run folder for its newest complete checkpoint), written to OUT (default: CHECKPOINT/model). The model is built
    on the meta device from the llava.json that trainer_state.json keeps, so no base weight is read; every
    trainable weight must be in the checkpoint."""
    try:
        folder, tag = find_checkpoint(str(checkpoint), str(checkpoint))
    except SystemExit:
        raise SystemExit(f"export {checkpoint}: no complete checkpoint there (give RUN_DIR/checkpoints/step_N with its "
                         f"trainer_state.json, or a run folder)") from None
    folder = folder / tag
    state = read_json(folder / "trainer_state.json")
    if "llava" not in state:
        raise SystemExit(f"export {folder}: its trainer_state.json holds no llava.json (an older train.py wrote it): "
                         f"resume the run with this train.py and export its next checkpoint")
    cfg = {**state["llava"], **{k: loader.base_path(state["llava"][k], folder) for k in ("llm", "vision")}}
    m = empty_model(cfg, torch.float32, "meta")
    m.requires_grad_(False)
    add_trainable_parts(m, cfg)  # adapters are created where their base weight is: on the meta device
    every = dict(m.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    sd = read_trainable(folder)
    check_trainable(sd, every, trainable, str(folder), "written by another version of train.py?")
    dtype = getattr(torch, cfg["dtype"])  # what the stage output of the run itself holds
    # only the trainable tensors are assigned (the frozen base stays on the meta device: save_model never writes it)
    m.load_state_dict({n: sd[n].to(dtype) for n in trainable}, strict=False, assign=True)
    if m.llm.cfg.tie_word_embeddings:
        m.llm.lm_head.weight = m.llm.embed_tokens.weight
    out = Path(out or folder / "model")
    loader.save_model(m, out, cfg)
    print(f"wrote {out} from {folder} (step {state['step']})")
    return out
