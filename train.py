"""Train LLaVA under DeepSpeed: stage 1 (projector alignment) or stage 2 (instruction finetuning); or, with
`--stage sft`, the LLM alone on text conversations (no vision tower, no projector).

    python train.py @recipes/pretrain.args --llm LLM_DIR --vision CLIP_DIR            # one process
    python train.py @recipes/internlm2-sft-qlora.args --data messages.jsonl            # text-only, packed rows
    deepspeed train.py @recipes/finetune-full-vitlora.args --init-from runs/latest   # all local GPUs
    torchrun --nproc_per_node 8 train.py @recipes/...                                # same, with torchrun
    NPROC_PER_NODE=8 python train.py @recipes/... --deepspeed deepspeed_zero3         # same, as XTuner launches
    python train.py plot runs/pretrain-...                                            # loss / lr curves -> PNG
    python train.py export runs/pretrain-.../checkpoints/step_500                     # a checkpoint -> model/

A recipe file holds one flag per line (`# comments` allowed); flags after it override it. The global batch a recipe
gives stays the same on any number of GPUs: the accumulation is derived from it. Several machines: docs/multi-gpu.md.

One optimizer step, the heart of this file (`train_step`):

    micro-batches b_1..b_A of this rank   (A = accumulation; the global batch is micro x A x world)
    N = sum of supervised tokens over b_1..b_A, all-reduced over the ranks
    for each b_i:  backward( loss_sum(b_i) * world / N )    DeepSpeed averages gradients over ranks, hence x world
    clip the gradient norm to 1.0, AdamW step, next learning rate

so the step's loss is the mean over *every* supervised token of the step, whatever the micro-batch / accumulation /
GPU split (XTuner averages per-micro-batch means, which weighs a token by its batch's size: SPEC §3).

The learning rate warms up linearly over the first 3% of the optimizer steps from lr x 1e-5, then follows a cosine
to 0, counted in optimizer steps (XTuner counts micro-batches; reference §4.1). bf16 runs keep fp32 master weights in
DeepSpeed's ZeRO optimizer. ZeRO-1/2 split the optimizer states (and gradients) over the ranks, ZeRO-3 the weights
too; a ZeRO-3 run gathers the weights it evaluates with or saves, so its model/ is the same as ZeRO-2's.

A run folder (`--out`) holds `checkpoints/` (exact resume: weights, optimizer, scheduler, step, sampler position,
RNG states; written to a temporary folder, renamed, then pointed at, so a kill never leaves a half-written
"latest"), `metrics.jsonl`, `eval/` (answers to fixed prompts) and `model/` (the stage output that chat, eval and
convert read: model.save_model; `export` rebuilds it from any checkpoint).

References: XTuner `xtuner/tools/train.py` and the LLaVA-Llama-3 configs (reference §4), DeepSpeed's engine API
(`deepspeed.initialize`, `engine.backward/step`, `save_checkpoint/load_checkpoint`), nanoGPT's train.py (the shape of
the loop and the progress line).
"""

import argparse
import itertools
import json
import math
import os
import random
import shlex
import shutil
import socket
import sys
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import torch

import clip
import llama
import lora
import model as llava
from model import IGNORE_INDEX, LLM_LORA_TARGETS, VISION_LORA_TARGETS
from weights import read_json, write_json

STAGES = ("pretrain", "finetune", "sft")
LLM_MODES = ("frozen", "frozen-nf4", "full", "lora", "qlora")
WARMUP_START = 1e-5  # warmup starts at lr x 1e-5 (XTuner's LinearLR start_factor)
# dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets, for the mfu field; other devices print no mfu
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12}


# ----------------------------------------------------------------------------------------------------------------
# Command line


REPEATABLE = ("--data", "--eval-prompt")  # flags that add to a list


class RecipeParser(argparse.ArgumentParser):
    """argparse with `@file` recipes whose lines read like a shell: `--lr 2e-5  # a comment`, quotes allowed.

    A later flag overrides a recipe's, as usual; for the repeatable flags (--data, --eval-prompt) the recipe's
    list is kept aside and used only when the command line gives none, so `@recipe --data mine.json` trains on
    mine.json alone instead of adding it to the recipe's datasets."""

    def convert_arg_line_to_args(self, line):
        words = shlex.split(line, comments=True)
        if words:
            flag, eq, value = words[0].partition("=")
            if flag in REPEATABLE:
                words[:1] = ["--recipe-" + flag[2:]] + ([value] if eq else [])
        return words


class LastOf(argparse.Action):
    """Store the value and clear the `other` option: of two ways to say one thing, the last one given counts."""

    def __init__(self, *a, other, **k):
        super().__init__(*a, **k)
        self.other = other

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        setattr(namespace, self.other, None)


# XTuner's `--deepspeed NAME` presets (xtuner/configs/deepspeed/*.json, reference §4.3): (--zero, --offload-optimizer)
XTUNER_DEEPSPEED = {"deepspeed_zero1": (1, False), "deepspeed_zero2": (2, False),
                    "deepspeed_zero2_offload": (2, True), "deepspeed_zero3": (3, False)}


class DeepSpeedPreset(argparse.Action):
    """`--deepspeed deepspeed_zero3` as XTuner spells it sets --zero and --offload-optimizer; a .json path is
    --deepspeed-config."""

    def __call__(self, parser, namespace, value, option_string=None):
        if value in XTUNER_DEEPSPEED:
            namespace.zero, namespace.offload_optimizer = XTUNER_DEEPSPEED[value]
        elif value.endswith(".json"):
            namespace.deepspeed_config = value
        else:
            parser.error(f"--deepspeed {value}: give one of {', '.join(XTUNER_DEEPSPEED)} or a DeepSpeed .json file")


def build_parser():
    p = RecipeParser(description=__doc__.split("\n\n")[0], fromfile_prefix_chars="@",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", choices=STAGES, required=True,
                   help="pretrain: projector only, images center-cropped; finetune: images padded to square; sft: "
                        "the LLM alone on text-only records (no --vision), its output a plain LLM plus adapter")
    g.add_argument("--llm", required=True,
                   help="HF Llama or InternLM2 folder (config.json, safetensors, tokenizer files)")
    g.add_argument("--vision", default=None,
                   help="HF CLIP folder (e.g. clip-vit-large-patch14-336); required for pretrain and finetune")
    g.add_argument("--template", default="llama3_chat", help="chat template name (data.TEMPLATES)")
    g.add_argument("--select-layer", type=int, default=-2, help="CLIP layer whose output feeds the projector")
    g.add_argument("--image-mode", choices=("pad", "crop"), default=None,
                   help="pad to square with the CLIP mean colour, or center-crop (default: crop for pretrain, pad for "
                        "finetune, as XTuner)")
    g.add_argument("--llm-mode", choices=LLM_MODES, default=None,
                   help="frozen | frozen-nf4 | full | lora | qlora (default: frozen for pretrain, full for finetune)")
    g.add_argument("--lora", dest="llm_mode", action="store_const", const="lora", help="same as --llm-mode lora")
    g.add_argument("--qlora", dest="llm_mode", action="store_const", const="qlora", help="same as --llm-mode qlora")
    g.add_argument("--lora-r", type=int, default=64)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.05)
    g.add_argument("--vision-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="LoRA on every CLIP linear (q k v out_proj fc1 fc2, all layers)")
    g.add_argument("--vision-lora-r", type=int, default=64)
    g.add_argument("--vision-lora-alpha", type=float, default=16)
    g.add_argument("--vision-lora-dropout", type=float, default=0.05)
    g.add_argument("--random-init", action="store_true",
                   help="random CLIP and LLM weights of the shapes in --vision / --llm, which may then also be a size "
                        "name (clip-vit-l-14-336, llama-3-8b): throughput and memory measurements without weights")
    g.add_argument("--init-from", default=None,
                   help="projector to start from: a run's model/ folder (or the run folder, or runs/latest), "
                        "XTuner's iter_N.pth (file or DeepSpeed folder) or XTuner's projector/ folder")

    g = p.add_argument_group("data")
    g.add_argument("--data", action="append", default=[],
                   help="RECORDS.json[l][:IMAGE_FOLDER] or a mix file (data.py); repeat to concatenate datasets")
    g.add_argument("--recipe-data", action="append", default=[], help=argparse.SUPPRESS)
    g.add_argument("--synthetic", type=int, default=0, metavar="N",
                   help="instead of --data: N random samples of exactly --max-length positions (one random image, "
                        "random text, its second half supervised), for throughput and scaling measurements")
    g.add_argument("--image-folder", default=None, help="folder the records' image paths are relative to")
    g.add_argument("--max-length", type=int, default=2048,
                   help="sequence limit in positions, counting every image's positions (576 per image)")
    g.add_argument("--pack", action=argparse.BooleanOptionalAction, default=False,
                   help="--stage sft: pack several samples into each row of --max-length positions, each sample "
                        "attending only to itself (data.PackedDataset; XTuner's pack_to_max_length)")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader worker processes per rank")

    g = p.add_argument_group("optimization")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default: 1e-3 pretrain, 2e-5 full finetune, 2e-4 (Q)LoRA finetune)")
    g.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--warmup-ratio", type=float, default=0.03, help="fraction of the optimizer steps spent warming up")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: no clipping)")
    g.add_argument("--micro-batch", type=int, default=1, help="samples per GPU per forward")
    # whichever of the two comes last wins, so a command line can override a recipe's choice with the other one
    g.add_argument("--accumulation", type=int, default=None, action=LastOf, other="global_batch",
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--global-batch", type=int, default=None, action=LastOf, other="accumulation",
                   help="samples per optimizer step over all GPUs; accumulation = global / (micro x world)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    g.add_argument("--seed", type=int, default=1024, help="XTuner's README seed")

    g = p.add_argument_group("DeepSpeed and memory")
    g.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=2, help="ZeRO stage")
    g.add_argument("--offload-optimizer", action="store_true", help="keep optimizer states in CPU memory (ZeRO>=1)")
    g.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each LLM block in backward instead of storing its activations")
    g.add_argument("--checkpoint-layers", type=int, default=None, metavar="K",
                   help="recompute only the first K LLM blocks (default: all); the rest keep their activations: "
                        "faster steps for more memory (an H100 pretrain at micro-batch 32 fits K=11 of 32)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile each LLM block (fuses the elementwise ops and the LoRA branches: on an H100 "
                        "1.3x faster pretrain steps, 1.7-1.8x faster LoRA/QLoRA steps, see BENCHMARKS.md); the "
                        "first steps pay the compilation")
    g.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="bf16: bf16 weights, fp32 master copies")
    g.add_argument("--deepspeed", action=DeepSpeedPreset, metavar="NAME|JSON",
                   help=f"XTuner's preset names ({', '.join(XTUNER_DEEPSPEED)}) or a .json as --deepspeed-config")
    g.add_argument("--deepspeed-config", default=None,
                   help="a DeepSpeed JSON whose entries override the ones built from these flags ('auto' keeps ours)")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)

    g = p.add_argument_group("run folder, checkpoints, evaluation")
    g.add_argument("--out", default=None, help="run folder (default runs/<stage>-<date-time>)")
    g.add_argument("--save-steps", type=int, default=500, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept (the newest)")
    g.add_argument("--no-save", action="store_true",
                   help="write neither checkpoints nor model/ (measurements: an 8B full finetune's checkpoint is "
                        "~100 GB of fp32 weights and Adam moments)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="'auto': continue from the newest complete checkpoint of --out (fresh start if none); "
                        "or a run folder / checkpoint folder")
    g.add_argument("--eval-every", type=int, default=0,
                   help="answer the eval prompts every N steps (0: at start and end only); needs --eval-image")
    g.add_argument("--eval-image", default=None, help="image the eval prompts are about")
    g.add_argument("--eval-prompt", action="append", default=None,
                   help="a prompt (repeatable; default XTuner's two: '请描述一下这张照片', 'Please describe this picture')")
    g.add_argument("--recipe-eval-prompt", action="append", default=None, help=argparse.SUPPRESS)
    g.add_argument("--eval-max-new-tokens", type=int, default=100)
    g.add_argument("--plot", action="store_true", help="write <out>/metrics.png at the end")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.synthetic and args.data:
        parser.error("--synthetic replaces --data: give one of them")
    args.data = [] if args.synthetic else args.data or args.recipe_data  # --synthetic also replaces a recipe's data
    args.eval_prompt = args.eval_prompt or args.recipe_eval_prompt
    del args.recipe_data, args.recipe_eval_prompt, args.deepspeed
    if not args.data and not args.synthetic:
        parser.error("--data is required (a LLaVA json/jsonl file, RECORDS.json:IMAGE_FOLDER, or a mix file)")
    if args.synthetic and args.eval_image:
        parser.error("--eval-image needs real data and a tokenizer: leave it out with --synthetic")
    if args.stage == "sft":
        given = [flag for flag, value in (("--vision", args.vision), ("--vision-lora", args.vision_lora),
                                          ("--init-from", args.init_from), ("--eval-image", args.eval_image))
                 if value]
        if given:
            parser.error(f"--stage sft trains the LLM alone on text: {', '.join(given)} does not apply (for images, "
                         "train --stage finetune with --vision)")
        if args.llm_mode in ("frozen", "frozen-nf4"):
            parser.error(f"--stage sft with --llm-mode {args.llm_mode} would train nothing: choose full, lora or qlora")
    else:
        if args.vision is None:
            parser.error(f"--stage {args.stage} needs --vision (a CLIP folder); for text-only training use --stage sft")
        if args.pack:
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
    if args.micro_batch < 1:
        raise SystemExit(f"--micro-batch {args.micro_batch}: must be at least 1")
    if args.global_batch is not None:
        per_pass = args.micro_batch * world_size
        if args.global_batch % per_pass:
            raise SystemExit(
                f"--global-batch {args.global_batch} is not divisible by --micro-batch {args.micro_batch} x "
                f"{world_size} processes = {per_pass}; choose a global batch that is a multiple of {per_pass}, or "
                f"change --micro-batch (or give --accumulation instead)")
        args.accumulation = args.global_batch // per_pass
    args.accumulation = args.accumulation or 1
    args.global_batch = args.micro_batch * args.accumulation * world_size
    if args.offload_optimizer and args.zero == 0:
        raise SystemExit("--offload-optimizer needs --zero 1, 2 or 3 (ZeRO owns the optimizer states it offloads)")
    if args.eval_prompt is None:
        args.eval_prompt = ["请描述一下这张照片", "Please describe this picture"]  # XTuner's EvaluateChatHook inputs
    return args


# ----------------------------------------------------------------------------------------------------------------
# Processes


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed():
    """Start (or join) the process group. `deepspeed` and `torchrun` set RANK etc.; a plain `python train.py` is
    rank 0 of 1 (without these variables DeepSpeed would try MPI discovery: env_check pitfall 2)."""
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    deepspeed.init_distributed()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = deepspeed.get_accelerator()
    if accel.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(accel.device_name())


def rank():
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world():
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def barrier():
    if world() > 1:
        torch.distributed.barrier()


def broadcast(obj):
    """Rank 0's value of a small picklable object, on every rank."""
    if world() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(t):
    if world() > 1:
        torch.distributed.all_reduce(t)
    return t


def log(*a):
    if rank() == 0:
        print(*a, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The model


def base_configs(args):
    """(CLIPConfig, LlamaConfig) from the config.json of --vision and --llm; with --random-init either may instead be
    a size name of clip.CONFIGS / llama.CONFIGS."""
    def one(path, cls, names, flag):
        if (Path(path) / "config.json").exists():
            return cls.from_hf_config(read_json(Path(path) / "config.json"))
        if getattr(args, "random_init", False) and path in names:
            return cls.from_name(path)
        raise SystemExit(f"{flag} {path}: no config.json there" + (
            f" and not a size name ({', '.join(names)})" if getattr(args, "random_init", False) else
            " (give the folder of an HF checkpoint; with --random-init a size name works too)"))

    return (None if args.vision is None else one(args.vision, clip.CLIPConfig, clip.CONFIGS, "--vision"),
            one(args.llm, llama.LlamaConfig, llama.CONFIGS, "--llm"))


def model_config(args):
    """llava.json for this run (model.save_model writes it; model.load_model reads it). A text-only run (sft) says
    "vision": None and "projector": None: its model/ is the LLM's adapter (or full weights) alone."""
    vcfg, lcfg = base_configs(args)
    lora_cfg = lambda r, a, d, t: {"r": r, "alpha": a, "dropout": d, "targets": list(t)}  # noqa: E731
    llm_lora = lora_cfg(args.lora_r, args.lora_alpha, args.lora_dropout, LLM_LORA_TARGETS) \
        if args.llm_mode in ("lora", "qlora") else None
    if vcfg is None:
        return {"llm": str(args.llm), "vision": None, "projector": None, "template": args.template,
                "image_tokens": 0, "llm_mode": args.llm_mode, "llm_lora": llm_lora, "vision_lora": None,
                "dtype": "bfloat16" if args.dtype == "bf16" else "float32"}
    return {
        "llm": str(args.llm), "vision": str(args.vision), "template": args.template,
        "select_layer": args.select_layer, "image_mode": args.image_mode,
        "image_size": vcfg.image_size, "image_tokens": vcfg.num_patches,
        "projector": {"in": vcfg.hidden_size, "hidden": lcfg.hidden_size, "out": lcfg.hidden_size},
        "llm_mode": args.llm_mode,
        "llm_lora": llm_lora,
        "vision_lora": lora_cfg(args.vision_lora_r, args.vision_lora_alpha, args.vision_lora_dropout,
                                VISION_LORA_TARGETS) if args.vision_lora else None,
        "dtype": "bfloat16" if args.dtype == "bf16" else "float32",
    }


def build_llava(args, cfg, device):
    """Base CLIP + base Llama + a fresh projector (nn.Linear's default init, as XTuner), then the trainable parts
    chosen by --llm-mode / --vision-lora. Everything else is frozen."""
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    nf4 = args.llm_mode in ("frozen-nf4", "qlora")
    torch.manual_seed(args.seed)  # the projector's and the adapters' initial values, the same on every rank
    # NF4: load the LLM in CPU memory and quantize one matrix at a time on the device, so the bf16 model never
    # has to fit on the GPU whole (lora.py)
    # --random-init draws on the device even with NF4 (a CPU takes minutes to draw 8B random numbers); the bf16 LLM
    # then exists whole on the GPU until quantization replaces it matrix by matrix (16 GB at 8B)
    build = random_model if args.random_init else llava.build_model
    m = build(cfg, dtype=dtype, device="cpu" if nf4 and not args.random_init else device)
    m.requires_grad_(False)
    if nf4:
        lora.quantize_nf4(m.llm, LLM_LORA_TARGETS, compute_dtype=dtype, device=device)
        m.to(device)
    add_trainable_parts(m, cfg)
    if args.init_from:
        load_projector(m.projector, args.init_from)
    # all blocks, or the first K (--checkpoint-layers K): the others keep their activations and skip the recompute
    ac = args.activation_checkpointing
    m.llm.activation_checkpointing = args.checkpoint_layers if ac and args.checkpoint_layers is not None else ac
    if m.vision is not None:  # frozen: no graph at all
        m.vision.activation_checkpointing = args.activation_checkpointing and args.vision_lora
    return m.train()


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


def random_model(cfg, dtype, device, skeleton=False):
    """--random-init: CLIP and Llama of the configured shapes with their constructors' random weights (Llama: HF's
    N(0, 0.02)), built directly on `device` in `dtype`, so an 8B model needs neither a download nor an fp32 copy.
    skeleton=True builds on the meta device instead (shapes only, no memory), for `export`."""
    vcfg, lcfg = base_configs(argparse.Namespace(vision=cfg["vision"], llm=cfg["llm"], random_init=True))
    p = cfg["projector"]
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the training dtype (RoPE frequencies stay fp32)
    try:
        with torch.device("meta" if skeleton else device):
            if vcfg is None:  # a text-only run
                return llava.LLaVA(None, None, llama.Llama(lcfg))
            return llava.LLaVA(clip.CLIPVisionTower(vcfg), llava.Projector(p["in"], p["out"], p["hidden"]),
                               llama.Llama(lcfg), cfg.get("select_layer", -2))
    finally:
        torch.set_default_dtype(old)


def read_projector(path):
    """The projector state dict (our names) of a previous stage: our run folder here, every other layout through
    convert.read_projector (XTuner's iter_N.pth file or DeepSpeed folder, XTuner's projector/ folder)."""
    path = Path(path).resolve()  # runs/latest is a symlink to a model/ folder
    for folder in (path, path / "model"):
        if (folder / "llava.json").exists():
            from safetensors.torch import load_file

            return load_file(folder / "projector.safetensors")
    import convert

    return convert.read_projector(path)


def load_projector(projector, path):
    sd = read_projector(path)
    ours = projector.state_dict()
    bad = {k: (tuple(v.shape), tuple(ours[k].shape)) for k, v in sd.items() if k in ours and v.shape != ours[k].shape}
    missing, unexpected = sorted(set(ours) - set(sd)), sorted(set(sd) - set(ours))
    if bad or missing or unexpected:
        raise SystemExit(f"--init-from {path}: its projector does not fit this model (LLM {path} was trained with a "
                         f"different LLM or vision tower?): wrong shapes (file, ours) {bad}, missing {missing}, "
                         f"unexpected {unexpected}")
    with torch.no_grad():
        for k, v in sd.items():
            ours[k].copy_(v)
    log(f"projector initialised from {path}")


def parameter_table(m):
    """Trainable / frozen parameter counts and dtypes per part. NF4 weights count as in x out (bitsandbytes packs
    two 4-bit values per byte, so their numel is half the logical size)."""
    rows = {}
    for part in ("vision", "projector", "llm"):
        if getattr(m, part) is None:  # a text-only model
            continue
        trainable = frozen = 0
        dtypes = set()
        for mod in getattr(m, part).modules():
            for name, p in mod.named_parameters(recurse=False):
                n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves a 0-element stub on each rank
                if isinstance(mod, lora.LoRALinear) and name == "weight" and mod.nf4:
                    n, dt = mod.in_features * mod.out_features, "nf4"
                else:
                    dt = str(p.dtype).replace("torch.", "")
                dtypes.add(dt)
                if p.requires_grad:
                    trainable += n
                else:
                    frozen += n
        rows[part] = (trainable, frozen, sorted(dtypes))
    return rows


def flops_per_token(m):
    """Model FLOPs of one training position in the LLM blocks, for the mfu field: 2 per weight in forward, 2 more
    for the gradient w.r.t. the input (it flows through the whole LLM to the projector in every mode), 2 more per
    trainable weight. Left out, as usual for MFU: activation recomputation, attention scores, the lm_head (run only
    on supervised positions) and the vision tower (a few % of the work)."""
    weights = sum(sub.in_features * sub.out_features for sub in m.llm.layers.modules()
                  if isinstance(sub, (torch.nn.Linear, lora.LoRALinear)))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in m.llm.layers.parameters() if p.requires_grad)
    return 4 * weights + 2 * trainable


# ----------------------------------------------------------------------------------------------------------------
# Optimizer, schedule, DeepSpeed config


def lr_factor(step, total, warmup_ratio=0.03):
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`: linear from 1e-5 to 1 over the
    first warmup_ratio of the steps, then a cosine from 1 down to 0."""
    warmup = int(warmup_ratio * total)
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def deepspeed_config(args, trainable=None):
    """The DeepSpeed config from the flags; `trainable`: the number of trainable parameters, if known."""
    zero = {"stage": args.zero}
    if args.zero > 0:
        zero["overlap_comm"] = True
    if args.zero in (1, 2) and trainable:
        # ZeRO-1/2 allocate their gradient buckets at full size (two with overlap_comm), 5e8 elements by default:
        # 2 GB in bf16 for a run that trains 20M (the projector) or 189M (LoRA) parameters. No bucket needs to be
        # larger than all the gradients together.
        zero["reduce_bucket_size"] = min(500_000_000, trainable)
    if args.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if args.zero == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    cfg = {
        "train_micro_batch_size_per_gpu": args.micro_batch,
        "gradient_accumulation_steps": args.accumulation,
        "gradient_clipping": args.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": args.dtype == "bf16"},  # bf16 weights; ZeRO keeps fp32 master copies
        "zero_allow_untested_optimizer": True,      # we pass torch's AdamW object
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10 ** 9,                 # we print our own progress line
        "wall_clock_breakdown": False,
    }
    if args.deepspeed_config:
        cfg = merge_config(cfg, json.loads(Path(args.deepspeed_config).read_text()))
    return cfg


def merge_config(ours, theirs):
    """The user's DeepSpeed JSON overrides ours key by key (nested dicts merged); "auto" keeps our value."""
    out = dict(ours)
    for k, v in theirs.items():
        if v == "auto":
            continue
        out[k] = merge_config(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def make_optimizer(params, args, device):
    if args.offload_optimizer:
        # the states live in CPU memory, where DeepSpeed's vectorised CPU Adam is many times faster than torch's
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay,
                                adamw_mode=True)
    # passing a torch optimizer object avoids DeepSpeed's JIT-compiled ops (env_check pitfall 3). fused: one kernel
    # for all parameters, on the GPU and on the CPU too (the demo's 16M-parameter step: 0.014 s instead of 0.126 s)
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(params, lr=args.lr, betas=tuple(args.betas), weight_decay=args.weight_decay, fused=fused)


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step


def train_step(engine, micro_batches, device):
    """Forward/backward every micro-batch of the step, then one optimizer update; returns (mean loss, grad norm).

    The loss of the step is sum(token losses) / N over all its supervised tokens on all ranks, so each micro-batch's
    summed loss is scaled by world / N before backward: DeepSpeed divides the all-reduced gradient by the world
    size, and we tell it not to divide by the accumulation count (scale_wrt_gas=False), since N already counts it.
    """
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)  # model.forward's count
    n = all_reduce_sum(torch.tensor(float(local), dtype=torch.float64, device=device)).item()
    scale = world() / max(n, 1.0)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for i, b in enumerate(micro_batches):
        # an epoch's last step may hold fewer micro-batches than the accumulation: mark its boundary ourselves
        engine.set_gradient_accumulation_boundary(i == len(micro_batches) - 1)
        # packed rows (--pack) also carry each sample's positions and segment numbers (data.collate_packed)
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


def optimizer_steps(batches, accumulation):
    """Group an epoch's micro-batches into optimizer steps of `accumulation` (the last one may be shorter)."""
    it = iter(batches)
    while micro := list(itertools.islice(it, accumulation)):
        yield micro


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step_N/ (DeepSpeed's files + ours), "latest" names the newest complete one


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
        _write_text_atomic(folder / "latest", tag)  # DeepSpeed's own pointer-file name, so its tools find it too
        steps = sorted(int(p.name[5:]) for p in folder.glob("step_*") if p.name[5:].isdigit())
        for old in steps[:-keep] if keep > 0 else []:
            shutil.rmtree(folder / f"step_{old}", ignore_errors=True)
        for stale in folder.glob("tmp_step_*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
    barrier()


def _write_text_atomic(path, text):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        raise SystemExit(f"--resume {resume}: no complete checkpoint there (expected {folder}/step_N/trainer_state.json)")
    return None


def check_trainable(state, params, trainable, where, hint):
    """Stop unless `state` holds every trainable weight with the shape the model has (names them if not)."""
    missing = [n for n in trainable if n not in state]
    wrong = [f"{n} {tuple(state[n].shape)} vs {tuple(params[n].shape)}" for n in trainable
             if n in state and state[n].shape != params[n].shape]
    if missing or wrong:
        raise SystemExit(f"{where} does not hold this run's trainable weights ({hint}): missing {missing[:10]} "
                         f"({len(missing)} in all), wrong shapes {wrong[:10]}")


def load_checkpoint(engine, folder, tag):
    """Restore weights, optimizer, scheduler (DeepSpeed) and our state. Only trainable weights were saved, so we load
    them ourselves and check that every one of them was in the file (DeepSpeed's strict load would fail on the
    missing frozen ones and on bitsandbytes' extra NF4 keys: env_check pitfall 5)."""
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


# ----------------------------------------------------------------------------------------------------------------
# Stage output: out/model/, and runs/latest -> it


def save_stage_output(engine, cfg, out):
    """model.save_model on rank 0; under ZeRO-3 the saved weights are gathered from every rank first."""
    m = engine.module
    gather = nullcontext()
    if engine.zero_optimization_stage() == 3:
        import deepspeed

        saved = [p for n, p in m.named_parameters()
                 if n.startswith("projector.") or ".lora_" in n or (cfg["llm_mode"] == "full" and n.startswith("llm."))]
        gather = deepspeed.zero.GatheredParameters(saved, modifier_rank=None)
    with gather:
        if rank() == 0:
            folder = Path(out) / "model"
            tmp = Path(out) / "model.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            llava.save_model(m, tmp, cfg)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)
            link_latest(folder)
    barrier()


def read_trainable(folder):
    """{name: tensor} of the trainable weights in checkpoint `folder`, whatever the ZeRO stage and process count.

    With ZeRO 1-3 the trainable weights live as fp32 partitions of the optimizer, one file per rank (ZeRO-3's model
    files hold only placeholders); DeepSpeed's zero_to_fp32 reassembles them. Without ZeRO the model-states file
    holds them whole; it is read with convert.py's restricted unpickler, which builds tensors and nothing else."""
    if list(folder.glob("*zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name,
                                                        exclude_frozen_parameters=True)
    import convert

    states = folder / "mp_rank_00_model_states.pt"
    if not states.exists():
        raise SystemExit(f"{folder}: neither ZeRO optimizer partitions nor mp_rank_00_model_states.pt: not a "
                         f"DeepSpeed checkpoint of train.py")
    return convert.safe_torch_load(states)["module"]


def export_checkpoint(checkpoint, out=None):
    """`python train.py export CHECKPOINT [OUT]`: the model/ folder (chat, eval_mmbench and convert read it) of a
    checkpoint folder (run/checkpoints/step_N, or a run folder for its newest complete checkpoint), written to OUT
    (default: CHECKPOINT/model). The model is built on the meta device from the run's flags, which
    trainer_state.json keeps, so no base weight is read; every trainable weight must be in the checkpoint."""
    try:
        folder, tag = find_checkpoint(str(checkpoint), str(checkpoint))
    except SystemExit:
        raise SystemExit(f"export {checkpoint}: no complete checkpoint there (give RUN_DIR/checkpoints/step_N with its "
                         f"trainer_state.json, or a run folder)") from None
    folder = folder / tag
    args = argparse.Namespace(**read_json(folder / "trainer_state.json")["args"])
    cfg = model_config(args)
    m = random_model(cfg, torch.float32, "cpu", skeleton=True)
    m.requires_grad_(False)
    add_trainable_parts(m, cfg)  # adapters are created where their base weight is: on the meta device
    every = dict(m.named_parameters(remove_duplicate=False))  # tied weights appear under both names
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    sd = read_trainable(folder)
    check_trainable(sd, every, trainable, str(folder), "written by another version of train.py?")
    dtype = llava.DTYPES[cfg["dtype"]]  # what the stage output of the run itself holds
    # only the trainable tensors are assigned (the frozen base stays on the meta device: save_model never writes it)
    m.load_state_dict({n: sd[n].to(dtype) for n in trainable}, strict=False, assign=True)
    if m.llm.cfg.tie_word_embeddings:
        m.llm.lm_head.weight = m.llm.embed_tokens.weight
    out = Path(out or folder / "model")
    llava.save_model(m, out, cfg)
    print(f"wrote {out} from {folder} (step {read_json(folder / 'trainer_state.json')['step']})")
    return out


def link_latest(model_dir):
    """<runs>/latest -> <run>/model, a relative symlink replaced atomically (rename over the old link)."""
    model_dir = Path(model_dir).absolute()
    runs = model_dir.parent.parent
    link, tmp = runs / "latest", runs / f".latest.{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(model_dir, runs), tmp)
    os.replace(tmp, link)


# ----------------------------------------------------------------------------------------------------------------
# Progress: one line per optimizer step, metrics.jsonl, a tqdm bar


class Progress:
    def __init__(self, out, total_steps, start_step, flops_per_token, device):
        from tqdm import tqdm

        self.total, self.device, self.flops = total_steps, device, flops_per_token
        self.peak = None
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            # "mem": the peak of training alone, not of loading (--random-init with NF4 briefly holds the bf16 LLM)
            torch.cuda.reset_peak_memory_stats(device)
        self.file = Path(out) / "metrics.jsonl"
        self.bar = None
        if rank() == 0:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal (logs, tests)
        self.t = time.perf_counter()

    def step(self, step, epoch, loss, lr, gnorm, tokens, samples, bf16):
        """Print and record one optimizer step; returns the record."""
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "gnorm": gnorm,
               "tok_s": tokens / dt, "samples_s": samples / dt, "world": world(), "time": time.time()}
        line = (f"step {step}/{self.total} | loss {loss:.3f} | lr {lr:.1e} | gnorm {gnorm:.2f} | "
                f"{rec['tok_s']:,.0f} tok/s | {rec['samples_s']:.1f} samples/s")
        if self.peak and bf16:
            rec["mfu"] = self.flops * rec["tok_s"] / (world() * self.peak)
            line += f" | mfu {100 * rec['mfu']:.0f}%"
        if self.device.type == "cuda":
            rec["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            line += f" | mem {rec['mem_gb']:.1f} GB"
        if rank() == 0:
            with open(self.file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.bar is not None and not self.bar.disable:
                self.bar.update(1)
                self.bar.write(line)
            else:
                print(line, flush=True)
        return rec

    def restart_clock(self):
        """Leave evaluation and checkpoint time out of the next step's throughput."""
        self.t = time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def truncate_metrics(out, step):
    """Drop metrics.jsonl records past `step` (written by a run killed after its last checkpoint)."""
    f = Path(out) / "metrics.jsonl"
    if rank() == 0 and f.exists():
        keep = [ln for ln in f.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        _write_text_atomic(f, "".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------------------------
# Evaluation prompts (XTuner's EvaluateChatHook, greedy)


def evaluate(engine, tok, cfg, args, step, device):
    """Answer every --eval-prompt about --eval-image (padded to square, as XTuner's hook does); rank 0 prints them
    and writes out/eval/step_N.txt."""
    import data

    m = engine.module
    img = clip.preprocess(clip.load_image(args.eval_image), cfg["image_size"], pad_to_square=True)[None]
    stop = data.stop_token_ids(tok, cfg["template"])
    gather = nullcontext()
    if engine.zero_optimization_stage() == 3:  # every rank needs the whole model to run it
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(m.parameters()), modifier_rank=None)
    answers = []
    was_training = m.training
    m.eval()
    with gather:
        for prompt in args.eval_prompt:
            ids = data.encode_prompt(tok, cfg["template"], "<image>\n" + prompt, image_tokens=cfg["image_tokens"])
            new = llava.generate(m, [ids], img.to(device), max_new_tokens=args.eval_max_new_tokens, stop_ids=stop)
            answers.append((prompt, tok.decode(new[0])))
        m.llm.free_cache()
    m.train(was_training)
    if rank() == 0:
        text = "".join(f"[{p}]\n{a}\n\n" for p, a in answers)
        (Path(args.out) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval" / f"step_{step}.txt").write_text(text)
        log(f"--- eval at step {step} ---\n{text.rstrip()}")
    return answers


# ----------------------------------------------------------------------------------------------------------------
# Data: data.py builds datasets, samplers and batches; here they are only wired to the loop


class SyntheticData(torch.utils.data.Dataset):
    """--synthetic N: N samples of exactly `length` positions, the same for a given index and seed on every rank.

    Each is one random image (image_tokens positions after the first token) then random text ids, the second half of
    the text supervised (as a caption or an answer would be), shaped as data.py's items, so the training step, and
    its speed, are those of real data of that length."""

    def __init__(self, n, length, image_tokens, image_size, vocab_size, seed=0):
        text = length - image_tokens
        if text < 4:
            raise SystemExit(f"--synthetic: --max-length {length} leaves no room for text after the {image_tokens} "
                             f"image positions; use at least {image_tokens + 4}")
        self.n, self.length, self.text, self.image_tokens, self.image_size = n, length, text, image_tokens, image_size
        self.vocab, self.seed = min(vocab_size, 128000), seed  # Llama-3's 128,000 ordinary ids: no control token
        self.stats = {"records": n, "bad_record": 0, "too_long": 0, "no_supervised": 0, "truncated_at_turn": 0,
                      "truncated_in_answer": 0}
        self.modality_lengths = np.full(n, length if image_tokens else -length)  # one length; negative: text-only

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        text = torch.randint(0, self.vocab, (self.text,), generator=g)
        image = torch.full((self.image_tokens,), llava.IMAGE_TOKEN_INDEX)
        input_ids = torch.cat([text[:1], image, text[1:]])  # (length,)
        labels = input_ids.clone()
        labels[: self.length - self.text // 2] = IGNORE_INDEX
        # already "normalised"; a text-only run (image_tokens 0) has no image
        pixels = torch.randn(1, 3, self.image_size, self.image_size, generator=g) if self.image_tokens else None
        return {"id": f"synthetic-{i}", "input_ids": input_ids, "labels": labels, "pixel_values": pixels,
                "replaced": []}


def build_data(args, tok, cfg):
    """The tokenized dataset (bad and over-long records already dropped and counted) and this rank's sampler:
    shuffled for pretrain, grouped by length for finetune and sft (XTuner's choice per stage); with --pack, rows of
    packed samples, shuffled."""
    import data

    text_only = cfg["vision"] is None
    images = {} if text_only else dict(image_tokens=cfg["image_tokens"], image_size=cfg["image_size"],
                                       image_mode=cfg["image_mode"])
    if args.synthetic:
        vocab = base_configs(args)[1].vocab_size
        ds = SyntheticData(args.synthetic, args.max_length, cfg["image_tokens"], cfg.get("image_size", 0), vocab,
                           args.seed)
    else:
        ds = data.open_data(args.data, tok, cfg["template"], args.image_folder, max_length=args.max_length,
                            progress=rank() == 0, log=log, **images)
    if len(ds) == 0:
        raise SystemExit(f"no usable sample in {args.data} (see the data report above; python data.py check ...)")
    with_image = np.flatnonzero(np.asarray(ds.modality_lengths) > 0) if text_only else []
    if len(with_image):
        first = ds.record_ids[with_image[0]] if hasattr(ds, "record_ids") else f"sample {with_image[0]}"
        raise SystemExit(f"--stage sft trains the LLM alone, but {len(with_image):,} of the {len(ds):,} samples in "
                         f"{args.data} have an image (the first: {first}): remove those records (or their `image` "
                         f"key), or train them with --stage finetune --vision CLIP_DIR")
    if args.pack:
        ds = data.PackedDataset(ds, args.max_length, seed=args.seed)
        log(ds.summary())
    if args.stage == "pretrain" or args.pack:  # packs are all about --max-length long: grouping has nothing to do
        sampler = data.ShuffleSampler(len(ds), seed=args.seed, world_size=world(), rank=rank())
    else:
        sampler = data.LengthGroupedSampler(ds.modality_lengths, args.micro_batch * args.accumulation,
                                            seed=args.seed, world_size=world(), rank=rank())
    if len(sampler) == 0:
        raise SystemExit(f"{len(ds)} samples cannot feed {world()} processes (fewer samples than processes)")
    return ds, sampler


def collate_batch(items, image_tokens, packed=False):
    import data

    batch = data.collate_packed(items) if packed else data.collate(items, image_tokens=image_tokens)
    batch["positions"] = sum(len(x["input_ids"]) for x in items)  # real (unpadded) positions, for tok/s
    return batch


def make_loader(ds, sampler, args, cfg, epoch, start):
    """This rank's batches of one epoch, skipping the first `start` samples of its share without loading them."""
    sampler.set_epoch(epoch, start_index=start)
    return torch.utils.data.DataLoader(
        ds, batch_size=args.micro_batch, sampler=sampler, num_workers=args.num_workers,
        collate_fn=partial(collate_batch, image_tokens=cfg["image_tokens"], packed=args.pack),
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating the iterator then draws no number from the global RNG, which dropout uses,
        # so a resumed run draws the same dropout masks as an uninterrupted one
        generator=torch.Generator().manual_seed(args.seed + epoch))


def data_report(ds, sampler):
    import data

    st = ds.stats
    dropped = st["bad_record"] + st["too_long"] + st["no_supervised"]
    packed = isinstance(ds, data.PackedDataset)
    rows = f" in {len(ds):,} packed rows ({ds.fill:.0%} filled)" if packed else ""
    return (f"{st['records']:,} records -> {len(ds.ds if packed else ds):,} samples{rows} | dropped {dropped:,} "
            f"({st['bad_record']:,} bad, {st['too_long']:,} too long, {st['no_supervised']:,} with nothing supervised)"
            f" | truncated {st['truncated_at_turn'] + st['truncated_in_answer']:,} | left out by the sampler per epoch "
            f"{sampler.n_left_out} (samples % processes)")


# ----------------------------------------------------------------------------------------------------------------
# The run


def train(args):
    import deepspeed

    device = init_distributed()
    resolve_args(args, world())
    resume = None
    if args.resume:
        if args.out is None and args.resume == "auto":
            raise SystemExit("--resume auto continues the run in --out: give --out RUN_DIR")
        if args.out is None:  # --resume RUN_DIR or --resume RUN_DIR/checkpoints/step_N
            given = Path(args.resume)
            args.out = str(given.parent.parent if (given / "trainer_state.json").exists() else given)
        resume = find_checkpoint(args.resume, args.out)
        if resume is None:
            log(f"--resume auto: no complete checkpoint in {args.out}/checkpoints yet; starting from scratch")
    args.out = broadcast(args.out or f"runs/{args.stage}-{time.strftime('%Y%m%d-%H%M%S')}")
    out = Path(args.out)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "args.json", vars(args))
    barrier()

    cfg = model_config(args)
    from tokenizer import load_tokenizer

    tok = None if args.synthetic else load_tokenizer(args.llm)
    ds, sampler = build_data(args, tok, cfg)
    m = build_llava(args, cfg, device)
    if args.compile:
        m.llm.compile_blocks()  # in place (Module.compile): parameter names and checkpoints are unchanged
    params = [p for p in m.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, args, device)

    # steps counted in optimizer steps; an epoch's last step may hold fewer micro-batches (train_step)
    steps_per_epoch = math.ceil(math.ceil(len(sampler) / args.micro_batch) / args.accumulation)
    total = args.epochs * steps_per_epoch
    if args.max_steps:
        total = min(total, args.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, args.warmup_ratio))
    ds_config = deepspeed_config(args, trainable=sum(p.numel() for p in params))
    engine, _, _, _ = deepspeed.initialize(model=m, model_parameters=params, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=ds_config)

    step, epoch, consumed = 0, 0, 0  # consumed: samples of the current epoch this rank has trained on
    if resume:
        state = load_checkpoint(engine, *resume)
        step, epoch, consumed = state["step"], state["epoch"], state["consumed"]
        # recompute this step's lr from the schedule: it differs from the saved one if --max-steps / --epochs changed
        scheduler.last_epoch = step - 1
        scheduler.step()
        for k in ("micro_batch", "accumulation", "global_batch", "seed", "max_length", "data"):
            if state["args"].get(k) != getattr(args, k):
                log(f"warning: --{k.replace('_', '-')} was {state['args'].get(k)} in the checkpoint, now "
                    f"{getattr(args, k)}: the resumed run will not see the data in the same order")
        truncate_metrics(out, step)
        log(f"resumed from {resume[0] / resume[1]} at step {step} (epoch {epoch}, {consumed} samples into it)")

    report = data_report(ds, sampler)
    summary(args, m, report, total, steps_per_epoch)
    progress = Progress(out, total, step, flops_per_token(m), device)
    if args.eval_image and step == 0:
        evaluate(engine, tok, cfg, args, step, device)
        progress.restart_clock()

    def trainer_state():
        return {"step": step, "epoch": epoch, "consumed": consumed, "world": world(), "args": vars(args)}

    losses, unreadable = [], set()  # records whose image failed to load (data.py used the next sample instead)
    while step < total:
        for micro in optimizer_steps(make_loader(ds, sampler, args, cfg, epoch, consumed), args.accumulation):
            lr = scheduler.get_last_lr()[0]  # the lr this step uses (DeepSpeed steps the scheduler after it)
            loss, gnorm = train_step(engine, micro, device)
            step += 1
            rows = sum(len(b["input_ids"]) for b in micro)
            consumed += rows  # the sampler's unit: a packed row counts once, whatever it holds
            samples = sum(len(b["ids"]) for b in micro)  # records trained on (a packed row holds several)
            unreadable.update((r["file"], r["id"]) for b in micro for r in b["replaced"])
            counts = all_reduce_sum(torch.tensor([float(sum(b["positions"] for b in micro)), float(samples)],
                                                 device=device)).tolist()
            progress.step(step, epoch, loss, lr, gnorm, counts[0], counts[1], args.dtype == "bf16")
            losses.append(loss)
            if step == total:
                break
            if args.eval_image and args.eval_every and step % args.eval_every == 0:
                evaluate(engine, tok, cfg, args, step, device)
                progress.restart_clock()
            if step % args.save_steps == 0 and not args.no_save:
                save_checkpoint(engine, out, trainer_state(), args.save_total_limit)
                progress.restart_clock()
        else:  # the epoch's data ran out before the step budget
            epoch, consumed = epoch + 1, 0
    progress.close()
    if not args.no_save:
        save_checkpoint(engine, out, trainer_state(), args.save_total_limit)
    if args.eval_image:
        evaluate(engine, tok, cfg, args, step, device)
    if not args.no_save:
        save_stage_output(engine, cfg, out)
    if world() > 1:
        every = [None] * world()
        torch.distributed.all_gather_object(every, unreadable)
        unreadable = set().union(*every)
    log(f"done: {step} steps | {len(unreadable)} records skipped because their image failed to load (the next "
        f"sample was used instead; python data.py check lists them) | "
        + ("nothing saved (--no-save)" if args.no_save else f"model in {out / 'model'}"))
    if cfg["vision"] is None and not args.no_save:
        log(f"to write a plain LLM folder (adapter merged, in the base model's layout): python convert.py "
            f"{out / 'model'} --to llm --out {out / 'merged'}")
    if args.plot and rank() == 0:
        plot(out)
    return {"out": str(out), "losses": losses, "engine": engine, "report": report,
            "unreadable": sorted(unreadable)}


def summary(args, m, report, total, steps_per_epoch):
    if rank() != 0:
        return
    lines = ["parameters (trainable / frozen, dtypes):"]
    for part, (t, f, dts) in parameter_table(m).items():
        lines.append(f"  {part:<9} {t:>15,} / {f:>15,}  {','.join(dts)}")
    ac = m.llm.activation_checkpointing  # as build_llava set it: True, False or the first K blocks
    checkpointing = "on" if ac is True else f"first {ac} blocks" if ac else "off"
    lines += [
        f"stage {args.stage}{' (text only)' if args.vision is None else ''}{' | packed' if args.pack else ''}"
        f" | llm {args.llm_mode}{' + vision LoRA' if args.vision_lora else ''} | dtype {args.dtype}"
        f" | ZeRO-{args.zero}{' + optimizer offload' if args.offload_optimizer else ''}"
        f" | activation checkpointing {checkpointing}",
        f"world {world()} x micro-batch {args.micro_batch} x accumulation {args.accumulation} = global batch "
        f"{args.global_batch} | {total} optimizer steps ({steps_per_epoch} per epoch) | lr {args.lr:.1e}",
        f"data: {report}",
        f"run folder: {args.out}",
    ]
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------------------
# `python train.py plot RUN_DIR`: loss and lr curves with PIL only


def plot(run_dir, path=None):
    from PIL import Image, ImageDraw

    f = Path(run_dir) / "metrics.jsonl"
    if not f.exists():
        raise SystemExit(f"no {f}: give a run folder of train.py (its --out)")
    recs = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    path = Path(path or Path(run_dir) / "metrics.png")
    W, H, pad = 900, 320, 60
    img = Image.new("RGB", (W, 2 * H), "white")
    d = ImageDraw.Draw(img)
    for row, (key, colour) in enumerate((("loss", (200, 40, 40)), ("lr", (40, 80, 200)))):
        pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None and math.isfinite(r[key])]
        top = row * H
        x0, x1, y0, y1 = pad, W - 20, top + H - 40, top + 20  # plot box (y grows downwards)
        d.rectangle([x0, y1, x1, y0], outline="black")
        d.text((x0, top + 4), f"{key} ({Path(run_dir).name})", fill="black")
        if not pts:
            continue
        sx, sy = [p[0] for p in pts], [p[1] for p in pts]
        lo_x, hi_x = min(sx), max(max(sx), min(sx) + 1)
        lo_y, hi_y = min(sy), max(sy)
        if hi_y == lo_y:
            lo_y, hi_y = lo_y - 0.5 * abs(lo_y or 1), hi_y + 0.5 * abs(hi_y or 1)
        X = lambda x: x0 + (x - lo_x) / (hi_x - lo_x) * (x1 - x0)  # noqa: E731
        Y = lambda y: y0 - (y - lo_y) / (hi_y - lo_y) * (y0 - y1)  # noqa: E731
        for i in range(5):  # axis labels at 5 evenly spaced values
            fx, fy = lo_x + i * (hi_x - lo_x) / 4, lo_y + i * (hi_y - lo_y) / 4
            d.text((X(fx) - 10, y0 + 6), f"{fx:.0f}", fill="black")
            d.text((4, Y(fy) - 6), f"{fy:.3g}", fill="black")
        d.line([(X(x), Y(y)) for x, y in pts] if len(pts) > 1 else [(X(sx[0]), Y(sy[0]))] * 2, fill=colour, width=2)
    img.save(path)
    print(f"wrote {path}")
    return path


def relaunch_like_xtuner(argv):
    """`NPROC_PER_NODE=8 python train.py ...` (and NNODES, NODE_RANK, ADDR, PORT) starts torchrun as `xtuner train`
    does (reference §8). Nothing happens under a launcher (RANK is set) or for one process on one machine."""
    nproc, nnodes = int(os.environ.get("NPROC_PER_NODE", 1)), int(os.environ.get("NNODES", 1))
    if "RANK" in os.environ or nproc * nnodes == 1:
        return
    if nnodes > 1 and not (os.environ.get("ADDR") and os.environ.get("PORT")):
        raise SystemExit(f"NNODES={nnodes}: set ADDR (the address of the machine with NODE_RANK=0) and PORT (a free "
                         f"port there), the same on every machine, and NODE_RANK=0..{nnodes - 1} on each")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}",
           f"--node_rank={os.environ.get('NODE_RANK', 0)}", f"--nproc_per_node={nproc}",
           f"--master_addr={os.environ.get('ADDR', '127.0.0.1')}",
           f"--master_port={os.environ.get('PORT') or random.randint(20000, 29999)}", sys.argv[0], *argv]
    print(" ".join(shlex.quote(c) for c in cmd), flush=True)
    os.execv(sys.executable, cmd)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["plot"]:
        if len(argv) != 2:
            raise SystemExit("usage: python train.py plot RUN_DIR")
        return plot(argv[1])
    if argv[:1] == ["export"]:
        if len(argv) not in (2, 3):
            raise SystemExit("usage: python train.py export RUN_DIR/checkpoints/step_N [OUT_DIR]")
        return export_checkpoint(*argv[1:])
    args = parse_args(argv)
    relaunch_like_xtuner(argv)
    return train(args)


if __name__ == "__main__":
    main()
