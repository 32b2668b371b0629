"""Training-step benchmark: ours (model.LLaVA + lora.py) or HF (LlavaForConditionalGeneration + peft + bitsandbytes
set up as XTuner sets it up), one workload per process.

    python bench/train_bench.py --side ours --workload pretrain            # 576 image + 64 text, micro-batch 32
    python bench/train_bench.py --side hf   --workload pretrain_long       # 2048 positions, micro-batch 8
    python bench/train_bench.py --side ours --workload qlora               # NF4 + double quant, LoRA r64, 1 x 2048
    python bench/train_bench.py --side ours --workload lora --ckpt-layers 0  # bf16 LoRA without recomputation
    python bench/train_bench.py --side hf   --workload quant_pretrain      # NF4 LLM frozen, projector, 1 x 2048
    add --tiny to run the same code at tiny shapes on the CPU.

A step is: forward (ours returns (loss_sum, n_tokens): loss = sum / n; HF returns the token-mean loss), backward,
fused AdamW step on the trainable parameters (bf16 weights on both sides), zero_grad. Reported: samples/s, tokens/s
(every position, image positions included, as the HF anchors count them), MFU (pretrain only, same useful-FLOP count
for both sides), and peak allocated CUDA memory from before the first step (optimizer state included).

Ours may skip recomputation where memory allows: `--ckpt-layers auto` picks how many of the 32 blocks are
checkpointed (llm.activation_checkpointing = k) from one measured step, retrying with more after an OOM.
"""

import gc
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

WORKLOADS = {  # image positions per sample come from the CLIP config (576, or 64 tiny)
    # name: (text tokens after the image (incl. 5 template tokens), supervised tokens, micro-batch), full / tiny
    "pretrain": ((64, 39, 32), (64, 39, 2)),
    "pretrain_long": ((2048 - 576, 39, 8), (192, 39, 2)),
    "qlora": ((2048 - 576, 733, 1), (192, 64, 1)),
    "lora": ((2048 - 576, 733, 1), (192, 64, 1)),
    # the quantized-LLM pretrain recipe: the LLM in NF4 (double quant) and frozen, the projector trained; HF only
    # (ours is train.py itself: bench/train_runs.sh quant-pt)
    "quant_pretrain": ((2048 - 576, 733, 1), (192, 64, 1)),
}
LORA = dict(r=64, alpha=16, dropout=0.05)  # XTuner's llama3 LLaVA LoRA settings


def extra_args(p):
    p.add_argument("--workload", choices=list(WORKLOADS), required=True)
    p.add_argument("--mb", type=int, default=0, help="micro-batch (default: the workload's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--ckpt-layers", default="auto",
                   help="ours: blocks to checkpoint (an int, 'all', or 'auto' = fewest that fit in memory)")
    p.add_argument("--profile", action="store_true", help="after timing, profile one step and print the top ops")
    p.add_argument("--compile", action="store_true", help="ours: torch.compile each decoder block (compile_blocks)")
    p.add_argument("--no-kbit-prep", action="store_true",
                   help="HF bf16 LoRA: skip prepare_model_for_kbit_training (which XTuner calls and which casts the "
                        "whole bf16 LLM to fp32); the base stays bf16")


# ---- ours --------------------------------------------------------------------------------------------------------


def setup_ours(args):
    import lora
    import model as M

    net = C.build_ours(args.tiny, args.device)
    net.vision.requires_grad_(False)
    net.llm.requires_grad_(False)
    if args.workload in ("qlora", "lora"):
        lora.inject_lora(net.llm, M.LLM_LORA_TARGETS, nf4=args.workload == "qlora", compute_dtype=torch.bfloat16,
                         device=args.device, **LORA)
    net.projector.requires_grad_(True)  # trained in every workload (XTuner's finetune trains it too)
    if args.compile:
        net.llm.compile_blocks()  # compiled during the first (checkpointing-search) step, before any timing
    net.train()
    return net


def ours_step_fn(net, opt, ids, labels, px):
    def step():
        loss_sum, n = net(ids, labels, px)
        (loss_sum / n).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ---- HF ----------------------------------------------------------------------------------------------------------


def quantize_hf_nf4(net, device):
    """Swap the LM's 7 linear kinds for bitsandbytes Linear4bit (NF4, double quant, bf16 compute): what
    from_pretrained(quantization_config=BitsAndBytesConfig(...)) builds, done in place on random weights."""
    import bitsandbytes as bnb

    lm = C.hf_language_model(net)
    targets = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    for name, child in list(lm.named_modules()):
        if name.rpartition(".")[2] in targets and isinstance(child, torch.nn.Linear):
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  compress_statistics=True, quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, blocksize=64,
                                         compress_statistics=True, quant_type="nf4").to(device)
            parent, _, attr = name.rpartition(".")
            setattr(lm.get_submodule(parent), attr, q)
    net.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; peft reads it to pick its Linear4bit LoRA


def setup_hf(args):
    net = C.build_hf(args.tiny, args.device)
    inner = net.model
    if args.workload == "quant_pretrain":  # XTuner: the LLM loaded in 4 bits, no LoRA, so no kbit preparation
        quantize_hf_nf4(net, args.device)
    if args.workload in ("qlora", "lora"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if args.workload == "qlora":
            quantize_hf_nf4(net, args.device)
        # XTuner calls this on the LLM for every LLM LoRA: freezes all, casts non-4-bit bf16 params to fp32
        # (embeddings, norms, lm_head) and, for 4-bit models, enables grad-ckpt + input grads
        if not args.no_kbit_prep:
            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=True)
            inner.vision_tower.to(torch.bfloat16)  # XTuner prepares only the LLM: CLIP and the projector stay bf16
            inner.multi_modal_projector.to(torch.bfloat16)
    net.requires_grad_(False)
    # XTuner (use_activation_checkpointing=True, always): input grads + gradient checkpointing on LLM, CLIP, projector
    net.enable_input_require_grads()
    net.gradient_checkpointing_enable()
    if args.workload in ("qlora", "lora"):
        target = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
        net = get_peft_model(net, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             bias="none", task_type="CAUSAL_LM", target_modules=target))
    inner.multi_modal_projector.requires_grad_(True)
    net.train()
    return net


def hf_step_fn(net, opt, ids, labels, px):
    def step():
        out = net(input_ids=ids, pixel_values=px, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


# ---- driver ------------------------------------------------------------------------------------------------------


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def try_step(step, device):
    """Run one step; False on CUDA OOM (everything the failed step held is released before returning)."""
    try:
        step()
        C.sync(device)
        return True
    except torch.OutOfMemoryError:
        pass
    free(device)  # outside the except block: the traceback no longer pins the failed step's tensors
    return False


def pick_checkpointing(net, step, args, n_layers):
    """The fewest checkpointed blocks whose step fits: start from all-but-what-the-first-step-suggests."""
    llm = net.llm
    if args.ckpt_layers != "auto":
        llm.activation_checkpointing = n_layers if args.ckpt_layers == "all" else int(args.ckpt_layers)
        if not try_step(step, args.device):
            raise SystemExit(f"OOM with --ckpt-layers {args.ckpt_layers}")
        return llm.activation_checkpointing
    if args.device != "cuda":
        llm.activation_checkpointing = 0
        step()
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    headroom = 4e9  # the caching allocator's fragmentation and cuBLAS workspaces need some slack
    # measure: everything checkpointed, then the cost of one non-checkpointed block from a second point
    llm.activation_checkpointing = n_layers
    C.reset_peak(args.device)
    if not try_step(step, args.device):
        raise SystemExit("OOM even with every block checkpointed")
    peak_all = torch.cuda.max_memory_allocated()
    k = n_layers - 2
    llm.activation_checkpointing = k
    C.reset_peak(args.device)
    if not try_step(step, args.device):
        return n_layers
    # with every block checkpointed the peak already holds one block's activations (its recomputation in
    # backward), so two blocks kept add about one block to it
    per_block = max(torch.cuda.max_memory_allocated() - peak_all, 1.0)
    k = max(0, n_layers - 1 - math.floor((total - headroom - peak_all) / per_block))
    print(f"checkpointing: peak {peak_all / 1e9:.1f} GB with all blocks, +{per_block / 1e9:.2f} GB per "
          f"non-checkpointed block -> try {k}", flush=True)
    while True:
        llm.activation_checkpointing = k
        if try_step(step, args.device):
            return k
        if k >= n_layers:
            raise SystemExit("OOM even with every block checkpointed")
        k = min(n_layers, k + 2)


def main():
    args = C.parse_args(extra_args)
    torch.manual_seed(0)
    vcfg, lcfg = C.configs(args.tiny)
    n_text, n_sup, mb = WORKLOADS[args.workload][1 if args.tiny else 0]
    mb = args.mb or mb
    P = vcfg.num_patches
    T = P + n_text
    t0 = time.perf_counter()
    if args.side == "ours" and args.workload == "quant_pretrain":
        raise SystemExit("--workload quant_pretrain is HF's side only; ours is train.py: bench/train_runs.sh quant-pt")
    net = setup_ours(args) if args.side == "ours" else setup_hf(args)
    image_id = -200 if args.side == "ours" else C.HF_IMAGE_TOKEN
    ids, labels = C.sample_ids(P, n_text - 5, n_sup, mb, lcfg.vocab_size, args.device, image_id)
    px = C.pixels(mb, vcfg.image_size, args.device)
    params = [p for p in net.parameters() if p.requires_grad]
    n_train = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)  # fused: one kernel for all params (CPU has one too)
    build_s = time.perf_counter() - t0
    free(args.device)
    C.reset_peak(args.device)
    make = ours_step_fn if args.side == "ours" else hf_step_fn
    step = make(net, opt, ids, labels, px)
    ckpt = "all (HF gradient_checkpointing)"
    if args.side == "ours":
        ckpt = pick_checkpointing(net, step, args, lcfg.num_layers)
        C.reset_peak(args.device)
        while not (try_step(step, args.device) and try_step(step, args.device)):  # warm-up; a step that only
            ckpt = net.llm.activation_checkpointing = min(lcfg.num_layers, ckpt + 2)  # just fit may not fit again
            print(f"warm-up OOM: {ckpt} blocks checkpointed", flush=True)
            C.reset_peak(args.device)
    else:
        step()  # warm-up
        step()
    t = C.now(args.device)
    for _ in range(args.steps):
        step()
    dt = (C.now(args.device) - t) / args.steps
    rec = dict(bench="train", workload=args.workload, micro_batch=mb, positions=T, supervised=n_sup,
               step_s=round(dt, 4), samples_s=round(mb / dt, 3), tokens_s=round(mb * T / dt, 1),
               peak_gb=round(C.peak_gb(args.device), 2), trainable_params=n_train, ckpt_layers=ckpt,
               build_s=round(build_s, 1), compiled=bool(args.compile), versions=C.versions())
    if args.side == "hf" and args.workload in ("qlora", "lora"):
        rec["kbit_prep"] = not args.no_kbit_prep
    if args.workload.startswith("pretrain"):
        rec["mfu"] = round(C.pretrain_model_flops(args.tiny, mb, T, n_sup) / dt / C.H100_BF16_PEAK, 4)
    C.emit(args, **rec)
    if args.profile:
        C.profile(step, args.device, f"{args.side} {args.workload} step (mb {mb}, ckpt {ckpt})")


if __name__ == "__main__":
    main()
