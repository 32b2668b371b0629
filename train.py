"""Train LLaVA under DeepSpeed: stage 1 (projector alignment) or stage 2 (instruction finetuning); or, with
`--stage sft`, the LLM alone on text conversations (no vision tower, no projector).

    python train.py @recipes/pretrain.args --llm LLM_DIR --vision CLIP_DIR          # one process
    python train.py @recipes/internlm2-sft-qlora.args --data messages.jsonl          # text-only, packed rows
    deepspeed train.py --stage finetune --qlora --llm LLM --vision CLIP --data DATA --init-from runs/latest
    deepspeed --num_gpus 8 train.py @recipes/finetune-full-vitlora.args --deepspeed deepspeed_zero3
    torchrun --nproc_per_node 8 train.py @recipes/...                              # the same, with torchrun
    python train.py export runs/pretrain-.../checkpoints/step_500                   # a checkpoint -> model/

`@FILE` reads a recipe (flags as on a command line, `# comments` allowed) first and the command line after it,
wherever @FILE stands: a flag on the command line overrides the recipe's, a list flag (--data, --eval-prompt) there
replaces the recipe's whole list. Size the optimizer step with one of --global-batch (samples over all GPUs: the
accumulation follows the GPU count, so a recipe trains alike on any) or --accumulation (micro-batches per GPU); one on
the command line replaces the recipe's. Several GPUs or machines: docs/multi-gpu.md.

One optimizer step, the heart of this file (`train_step`):

    micro-batches b_1..b_A of this rank   (A = accumulation; the global batch is micro x A x world)
    N = sum of supervised tokens over b_1..b_A, all-reduced over the ranks
    for each b_i:  backward( loss_sum(b_i) * world / N )    DeepSpeed averages gradients over ranks, hence x world
    clip the gradient norm to 1.0, AdamW step, next learning rate

so the step's loss is the mean over *every* supervised token of the step, whatever the micro-batch / accumulation /
GPU split (XTuner averages per-micro-batch means, which weighs a token by the size of its micro-batch). The learning
rate warms up linearly over the first 3% of the optimizer steps from lr x 1e-5, then follows a cosine to 0 (XTuner
counts micro-batches). bf16 and fp16 runs keep fp32 master weights in DeepSpeed's ZeRO optimizer; fp16 (for GPUs
without bf16) also scales the loss dynamically (an overflowing step is skipped; the lr schedule waits). ZeRO-3
gathers the weights it evaluates with or saves, so its model/ is the same as ZeRO-2's.

The run folder (`--out`): args.json, metrics.jsonl (extras/monitor.py; `python tools/plot.py RUN` draws it),
bad_records.jsonl, eval/step_N.txt, checkpoints/ and model/ (extras/checkpoint.py). References: XTuner's
`xtuner/tools/train.py` and LLaVA-Llama-3 configs, DeepSpeed's engine API, nanoGPT's train.py (the loop's shape).
"""

import argparse
import math
import os
import shlex
import sys
from pathlib import Path

import torch

import lora
from extras import loader
from extras.checkpoint import (TORCH_DTYPES, add_trainable_parts, export_checkpoint, load_projector, model_config,
                               open_run_folder, resume_training, save_checkpoint, save_stage_output)
from extras.distributed import (DEEPSPEED_PRESETS, all_reduce_sum, deepspeed_choice, deepspeed_config, gather_union,
                                init_distributed, leave_group, log, world)
from extras.lora_dropout import pack_lora_dropout
from extras.monitor import Progress, done, evaluate, evaluates, flops_per_token, summary
from extras.train_data import data_report, make_loader, make_sampler, open_dataset, optimizer_steps
from model import LLM_LORA_TARGETS
from tokenizer import IGNORE_INDEX

XTUNER_EVAL_PROMPTS = ["请描述一下这张照片", "Please describe this picture"]  # EvaluateChatHook inputs
STEP_SIZE_FLAGS = {"--global-batch", "--accumulation"}


# ----------------------------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", choices=("pretrain", "finetune", "sft"), required=True,
                   help="pretrain: the projector, images cropped; finetune: images padded; sft: the LLM alone, on text")
    g.add_argument("--llm", required=True, help="HF Llama or InternLM2 folder (config.json, safetensors, tokenizer)")
    g.add_argument("--vision", help="HF CLIP folder (e.g. clip-vit-large-patch14-336); for pretrain and finetune")
    g.add_argument("--template", default="llama3_chat", help="chat template name (data.TEMPLATES)")
    g.add_argument("--select-layer", type=int, default=-2, help="CLIP layer whose output feeds the projector")
    g.add_argument("--image-mode", choices=("pad", "crop"),
                   help="pad to square or center-crop (default: crop for pretrain, pad for finetune, as XTuner)")
    g.add_argument("--llm-mode", choices=("frozen", "frozen-nf4", "full"),
                   help="the LLM without adapters (default: frozen for pretrain, full otherwise)")
    g.add_argument("--lora", dest="llm_mode", action="store_const", const="lora", help="LoRA on the LLM's linears")
    g.add_argument("--qlora", dest="llm_mode", action="store_const", const="qlora", help="LoRA on a 4-bit NF4 LLM")
    g.add_argument("--lora-r", type=loader.count, default=64)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--vision-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="LoRA on every CLIP linear (q k v out_proj fc1 fc2, all layers)")
    g.add_argument("--vision-lora-r", type=loader.count, default=64)
    g.add_argument("--vision-lora-alpha", type=float, default=16)
    g.add_argument("--vision-lora-dropout", type=float, default=0.05)
    g.add_argument("--init-from", help="projector to start from: a run's folder or model/, XTuner's iter_N.pth")
    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", required=True,
                   help="RECORDS.json[l][:IMAGE_FOLDER] or a mix file (data.py); repeat to concatenate datasets")
    g.add_argument("--image-folder", help="folder the records' image paths are relative to")
    g.add_argument("--max-length", type=loader.count, default=2048, help="positions per sample, images included")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                   help="--stage sft: samples packed into rows of --max-length, each attending only to itself")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")
    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, help="peak lr (default: 1e-3 pretrain, 2e-5 full finetune, 2e-4 (Q)LoRA)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of the optimizer steps spent warming up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--micro-batch", type=loader.count, default=1, help="samples per GPU per forward")
    g.add_argument("--global-batch", type=loader.count, help="samples per optimizer step over all GPUs")
    g.add_argument("--accumulation", type=loader.count, help="micro-batches per optimizer step and GPU (default 1)")
    g.add_argument("--epochs", type=loader.count, default=1)
    g.add_argument("--max-steps", type=loader.count, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=1024, help="XTuner's README seed")
    g = p.add_argument_group("DeepSpeed and memory")
    g.add_argument("--deepspeed", type=deepspeed_choice, default="deepspeed_zero2", metavar="NAME|JSON",
                   help=f"{' | '.join(DEEPSPEED_PRESETS)}, or a .json over deepspeed_zero2 ('auto' keeps ours)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each LLM block in backward instead of storing its activations")
    g.add_argument("--checkpoint-layers", type=int, metavar="K",
                   help="recompute only the first K LLM blocks (default: all): faster steps for more memory")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile each LLM block (default: on a GPU unless ZeRO-3, off on a CPU; compile_default)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="bf16 (or fp16 with dynamic loss scaling, for GPUs without bf16) weights, fp32 master copies")
    g.add_argument("--loss-chunk", type=loader.count, default=512, metavar="N",
                   help="supervised positions per lm_head chunk (bounds the fp32 logits' memory: model.py)")
    g.add_argument("--cpu-embeddings", action=argparse.BooleanOptionalAction, default=False,
                   help="keep the frozen token-embedding table in CPU memory (1 GB less on the GPU at 8B): each "
                        "micro-batch looks its ids up there and sends the rows over")
    g.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the launchers
    g = p.add_argument_group("run folder, checkpoints, evaluation")
    g.add_argument("--out", help="run folder (default runs/<stage>-<date-time>)")
    g.add_argument("--save-steps", type=loader.count, default=500, help="checkpoint every N steps, and at the end")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept, the newest (0: all)")
    g.add_argument("--resume", nargs="?", const="auto", help="auto (--out's newest checkpoint), a run or checkpoint")
    g.add_argument("--eval-every", type=int, default=0, help="answer the eval prompts every N steps (0: start, end)")
    g.add_argument("--eval-image", help="image the eval prompts are about (pretrain, finetune)")
    g.add_argument("--eval-prompt", action="append", help="repeatable (default: XTuner's two; sft: none, as text)")
    g.add_argument("--eval-max-new-tokens", type=loader.count, default=100)
    return p


def parse_args(argv=None):
    """The flags, recipes read first (the rules are in this file's docstring), checked against each other."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    for a in argv:
        if a.startswith("@") and not Path(a[1:]).is_file():
            parser.error(f"{a}: no such recipe file")
    lines = [shlex.split(line, comments=True)  # a recipe holds one flag (and its value) per line
             for a in argv if a.startswith("@") for line in Path(a[1:]).read_text().splitlines()]
    given = [a for a in argv if not a.startswith("@")]
    named = {w.partition("=")[0] for w in given}  # a list flag or a step size given here drops the recipe's lines
    drop = named & {"--data", "--eval-prompt"} | (STEP_SIZE_FLAGS if named & STEP_SIZE_FLAGS else set())
    recipe = [w for line in lines if line and line[0].partition("=")[0] not in drop for w in line]
    args = parser.parse_args(recipe + given)  # the command line last: its flags override the recipe's
    if args.global_batch is not None and args.accumulation is not None:
        parser.error("--global-batch and --accumulation both size the optimizer step: give one of them")
    if args.stage == "sft":
        images = [flag for flag, value in (("--vision", args.vision), ("--vision-lora", args.vision_lora),
                                           ("--init-from", args.init_from), ("--eval-image", args.eval_image)) if value]
        if images:
            parser.error(f"--stage sft trains the LLM alone on text: {', '.join(images)} does not apply (for images, "
                         "train --stage finetune with --vision)")
        if args.llm_mode in ("frozen", "frozen-nf4"):
            parser.error(f"--stage sft with --llm-mode {args.llm_mode} trains nothing: give full, --lora or --qlora")
    elif args.vision is None:
        parser.error(f"--stage {args.stage} needs --vision (a CLIP folder); for text-only training use --stage sft")
    elif args.pack:
        parser.error("--pack is for --stage sft: samples with images are not packed")
    return args


def resolve_args(args, world_size):
    """Fill the stage-dependent defaults and derive accumulation; errors name the numbers at fault."""
    if args.llm_mode is None:
        args.llm_mode = "frozen" if args.stage == "pretrain" else "full"
    if args.image_mode is None and args.stage != "sft":  # sft has no images
        args.image_mode = "crop" if args.stage == "pretrain" else "pad"  # XTuner: pad_image_to_square only in finetune
    if args.lr is None:
        args.lr = 1e-3 if args.stage == "pretrain" else (2e-4 if args.llm_mode in ("lora", "qlora") else 2e-5)
    if args.global_batch is not None:
        per_pass = args.micro_batch * world_size
        if args.global_batch % per_pass:
            raise SystemExit(f"--global-batch {args.global_batch} is not divisible by --micro-batch "
                             f"{args.micro_batch} x {world_size} processes = {per_pass}; choose a global batch that is "
                             f"a multiple of {per_pass}, or change --micro-batch (or give --accumulation instead)")
        args.accumulation = args.global_batch // per_pass
    args.accumulation = args.accumulation or 1
    args.global_batch = args.micro_batch * args.accumulation * world_size
    # about --eval-image; a text-only run answers only the prompts given (XTuner's default ones ask about a picture)
    args.eval_prompt = args.eval_prompt or ([] if args.stage == "sft" else list(XTUNER_EVAL_PROMPTS))
    return args


# ----------------------------------------------------------------------------------------------------------------
# The model


def build_llava(args, cfg, device, base=loader.build_model):
    """Base CLIP + base LLM + a fresh projector (nn.Linear's default init, as XTuner), then the trainable parts
    llava.json names (add_trainable_parts: projector, adapters, the whole LLM in full mode). Everything else is
    frozen. `base(cfg, dtype, device)` builds the base model from --llm / --vision (bench/ passes random weights)."""
    dtype = TORCH_DTYPES[args.dtype]  # also NF4's compute dtype
    nf4 = args.llm_mode in ("frozen-nf4", "qlora")
    torch.manual_seed(args.seed)  # the projector's and the adapters' initial values, the same on every rank
    # NF4: the LLM is loaded in CPU memory and quantized one matrix at a time on the device, never whole there in bf16
    m = base(cfg, dtype=dtype, device="cpu" if nf4 else device)
    m.requires_grad_(False)
    if nf4:
        lora.quantize_nf4(m.llm, LLM_LORA_TARGETS, compute_dtype=dtype, device=device)
        m.to(device)
    add_trainable_parts(m, cfg)
    pack_lora_dropout(m)  # adapters' dropout masks kept at 1 bit an element for backward: the same maths
    if args.init_from:
        load_projector(m.projector, args.init_from)  # a previous stage's, in any layout extras.loader reads
    ac = args.activation_checkpointing
    m.llm.activation_checkpointing = args.checkpoint_layers if ac and args.checkpoint_layers is not None else ac
    if m.vision is not None:  # frozen: no graph at all
        m.vision.activation_checkpointing = args.activation_checkpointing and args.vision_lora
    m.loss_chunk = args.loss_chunk
    if args.cpu_embeddings:
        check_cpu_embeddings(m)  # before DeepSpeed's start-up; train() moves the table after it
    return m.train()


def check_cpu_embeddings(m):
    """--cpu-embeddings keeps the token-embedding table in CPU memory (Llama.embed looks ids up where the table is).
    Only a frozen table that is not also the lm_head can go: the optimizer never sees it there."""
    table = m.llm.embed_tokens.weight
    if table.requires_grad or m.llm.lm_head.weight is table:
        why = "it is trained (--llm-mode full)" if table.requires_grad else "it is also the lm_head (tied weights)"
        raise SystemExit(f"--cpu-embeddings: the token-embedding table cannot leave the GPU: {why}")


def compile_default(args, device):
    """--compile as given; by default on a GPU in every mode (an uncompiled LoRA / QLoRA step waits on kernel
    launches; frozen and full LLMs gain fused norms, RoPE and SwiGLU), except under ZeRO-3, whose hooks gather each
    block's weights around its forward; off on a CPU, where compiling takes longer than it saves."""
    if args.compile is not None:
        return args.compile
    return device.type == "cuda" and deepspeed_config(args)["zero_optimization"]["stage"] != 3


# ----------------------------------------------------------------------------------------------------------------
# Schedule, optimizer, and one optimizer step (DeepSpeed's config: extras/distributed.py)


def lr_factor(step, total, warmup_ratio=0.03):
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`: linear from 1e-5 (XTuner's LinearLR
    start_factor) to 1 over the first warmup_ratio of the steps, then a cosine from 1 down to 0."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return 1e-5 + (1 - 1e-5) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def make_optimizer(params, args, device, zero):
    if zero.get("offload_optimizer", {}).get("device", "none") != "none":
        # the states live in CPU memory, where DeepSpeed's vectorised CPU Adam is many times faster than torch's
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                adamw_mode=True)
    fused = device.type in ("cuda", "cpu")  # torch's AdamW spares DeepSpeed's JIT-built ops; fused: one kernel
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay, fused=fused)


def train_step(engine, micro_batches, device):
    """Forward/backward every micro-batch of the step, then one optimizer update; returns (mean loss, grad norm).
    The loss of the step is sum(token losses) / N over all its supervised tokens on all ranks, so each micro-batch's
    summed loss is scaled by world / N before backward: DeepSpeed divides the all-reduced gradient by the world size,
    and we tell it not to divide by the accumulation count (scale_wrt_gas=False), since N already counts it.
    fp16: engine.backward also multiplies by the loss scale, and the optimizer divides it out of the gradients; if
    they overflowed, engine.step skips the update (engine.was_step_applied() is False) and lowers the scale."""
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)  # model.forward's count
    n = all_reduce_sum(torch.tensor(float(local), dtype=torch.float64, device=device)).item()
    scale = world() / max(n, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(micro_batches):
        # an epoch's last step may hold fewer micro-batches than the accumulation: mark its boundary ourselves
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        # packed rows (--pack) also carry each sample's positions and segment numbers (collate_packed)
        pixels, positions, segments = (b.get(k) for k in ("pixel_values", "position_ids", "segment_ids"))
        s, _ = engine(b["input_ids"].to(device), b["labels"].to(device),
                      *(None if t is None else t.to(device) for t in (pixels, positions, segments)))
        engine.backward(s * scale, scale_wrt_gas=False)
        if i == len(micro_batches) - 1 and engine.zero_optimization_stage() == 0:
            # ZeRO optimizers report the norm they clip with; without ZeRO, measure the (all-reduced) gradients
            grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
            gnorm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        engine.step()
        loss_sum += s.detach().double()
    if engine.zero_optimization_stage() > 0:
        gnorm = engine.get_global_grad_norm()
    gnorm = float("nan") if gnorm is None else float(gnorm)
    return all_reduce_sum(loss_sum).item() / max(n, 1.0), gnorm


# ----------------------------------------------------------------------------------------------------------------
# The run


def train(args, base=loader.build_model, dataset=None, save=True):
    """Train as the flags say; returns the run folder, the losses, the engine and the data report.
    base, dataset, save: bench/train_synthetic.py's seams (random weights, synthetic samples, nothing written)."""
    import deepspeed

    device = init_distributed()
    resolve_args(args, world())
    args.compile = compile_default(args, device)
    out, resume = open_run_folder(args)  # with args.json; resume: the checkpoint --resume names, if any
    if args.stage == "finetune" and not args.init_from:
        log("warning: --stage finetune without --init-from: the projector starts from random weights; pass "
            "--init-from RUN (the pretrain run's folder or model/, or XTuner's iter_N.pth) to start from stage 1")

    cfg = model_config(args)
    tok = None if dataset else loader.load_tokenizer(args.llm)
    ds = dataset or open_dataset(args, tok, cfg)
    sampler = make_sampler(args, ds)
    m = build_llava(args, cfg, device, base)
    if args.compile:
        m.llm.compile_blocks()  # in place (Module.compile): parameter names and checkpoints are unchanged
    params = [p for p in m.parameters() if p.requires_grad]
    ds_config = deepspeed_config(args, trainable=sum(p.numel() for p in params), world_size=world())
    optimizer = make_optimizer(params, args, device, ds_config["zero_optimization"])

    steps_per_epoch = math.ceil(math.ceil(len(sampler) / args.micro_batch) / args.accumulation)
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, args.warmup_ratio))
    engine, _, _, _ = deepspeed.initialize(model=m, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)
    if args.cpu_embeddings:  # after deepspeed.initialize, which moves the whole model to the GPU
        m.llm.embed_tokens.to("cpu")

    step, epoch, consumed = 0, 0, 0  # consumed: samples of the current epoch this rank has trained on
    if resume:
        step, epoch, consumed = resume_training(engine, scheduler, resume, args, out)

    report = data_report(ds, sampler, out)
    summary(args, m, report, total, steps_per_epoch, ds_config)
    progress = Progress(out, total, step, flops_per_token(m), device, args.dtype != "fp32", args.compile)
    if evaluates(args) and step == 0:
        evaluate(engine, tok, cfg, args, step, device)
        progress.restart_clock()

    def trainer_state():  # what a checkpoint needs beyond DeepSpeed's files; llava.json lets `export` rebuild model/
        return {"step": step, "epoch": epoch, "consumed": consumed, "world": world(), "args": vars(args), "llava": cfg}

    losses, unreadable = [], set()  # records whose image failed to load (data.py used another sample instead)
    while step < total:
        for micro in optimizer_steps(make_loader(ds, sampler, args, cfg, epoch, consumed), args.accumulation):
            lr = scheduler.get_last_lr()[0]  # the lr this step uses (DeepSpeed steps the scheduler after it)
            loss_scale = engine.optimizer.loss_scale if args.dtype == "fp16" else None  # the one this step uses
            loss, gnorm = train_step(engine, micro, device)
            step += 1
            consumed += sum(len(b["input_ids"]) for b in micro)  # the sampler's unit: a packed row counts once
            samples = sum(len(b["ids"]) for b in micro)  # records trained on (a packed row holds several)
            unreadable.update((r["file"], r["id"]) for b in micro for r in b["replaced"])
            counts = all_reduce_sum(torch.tensor([float(sum(b["positions"] for b in micro)), float(samples)],
                                                 device=device)).tolist()
            progress.step(step, epoch, loss, lr, gnorm, counts[0], counts[1], loss_scale, engine.was_step_applied())
            losses.append(loss)
            if step == total:
                break
            if evaluates(args) and args.eval_every and step % args.eval_every == 0:
                evaluate(engine, tok, cfg, args, step, device)
                progress.restart_clock()
            if step % args.save_steps == 0 and save:
                save_checkpoint(engine, out, trainer_state(), args.save_total_limit)
                progress.restart_clock()
        else:  # the epoch's data ran out before the step budget
            epoch, consumed = epoch + 1, 0
    progress.close()
    if evaluates(args):
        evaluate(engine, tok, cfg, args, step, device)
    if save:
        save_checkpoint(engine, out, trainer_state(), args.save_total_limit)
        save_stage_output(engine, cfg, out)
    unreadable = gather_union(unreadable)
    done(step, unreadable, out, save, text_only=cfg["vision"] is None)
    return {"out": str(out), "losses": losses, "engine": engine, "report": report, "unreadable": sorted(unreadable)}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        if len(argv) not in (2, 3):
            raise SystemExit("usage: python train.py export RUN_DIR/checkpoints/step_N [OUT_DIR]")
        return export_checkpoint(*argv[1:])
    args = parse_args(argv)
    if (n := os.environ.get("NPROC_PER_NODE")) and "RANK" not in os.environ:  # XTuner's way to ask for N processes
        raise SystemExit(f"NPROC_PER_NODE={n}: train.py starts no processes itself; launch it with `deepspeed "
                         f"--num_gpus {n} train.py ...` or `torchrun --nproc_per_node {n} train.py ...`")
    result = train(args)
    leave_group()  # several processes: every rank leaves the group together, not at the interpreter's exit
    return result


if __name__ == "__main__":
    main()
