"""What a train.py run tells while it trains: the summary at the start, one progress line per optimizer step (the
same fields appended to metrics.jsonl), the answers to fixed prompts (XTuner's EvaluateChatHook, greedy), and the
last lines at the end.

    step 120/5000 | loss 1.234 | lr 2.0e-05 | gnorm 0.87 | 9,450 tok/s | 14.2 samples/s | mfu 41% | mem 61.2 GB

tok/s counts every position (image positions included) over all ranks; mfu appears only in bf16 / fp16 on a GPU
whose peak is known, mem (the peak allocated since training began, rank 0) only on a GPU. fp16 runs add the loss
scale the step used; a step DeepSpeed skipped (inf/nan gradients: an fp16 overflow) says so. With compiled blocks
the first step's line gives its time, and a later line how much of it went to compiling.
"""

import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

import clip
import data
import lora
from extras.distributed import log, rank, world
from model import generate

# dense bf16 tensor-core peaks (FLOP/s, fp16's are the same) from the vendors' data sheets, for the mfu field; other
# devices print no mfu
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12, "A800": 312e12}


# ----------------------------------------------------------------------------------------------------------------
# The summary at the start, the last lines at the end


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


def summary(args, m, report, total, steps_per_epoch, ds_config):
    if rank() != 0:
        return
    lines = ["parameters (trainable / frozen, dtypes):"]
    for part, (t, f, dts) in parameter_table(m).items():
        lines.append(f"  {part:<9} {t:>15,} / {f:>15,}  {','.join(dts)}")
    ac = m.llm.activation_checkpointing  # as train.build_llava set it: True, False or the first K blocks
    checkpointing = "on" if ac is True else f"first {ac} blocks" if ac else "off"
    zero = ds_config["zero_optimization"]
    offload = " + optimizer offload" if zero.get("offload_optimizer", {}).get("device", "none") != "none" else ""
    lines += [
        f"stage {args.stage}{' (text only)' if args.vision is None else ''}{' | packed' if args.pack else ''}"
        f" | llm {args.llm_mode}{' + vision LoRA' if args.vision_lora else ''} | dtype {args.dtype}"
        f" | ZeRO-{zero['stage']}{offload} | activation checkpointing {checkpointing}"
        f" | compiled blocks {'on' if args.compile else 'off'} | loss chunk {args.loss_chunk}"
        f"{' | embeddings in CPU memory' if args.cpu_embeddings else ''}",
        f"world {world()} x micro-batch {args.micro_batch} x accumulation {args.accumulation} = global batch "
        f"{args.global_batch} | {total} optimizer steps ({steps_per_epoch} per epoch) | lr {args.lr:.1e}",
        f"data: {report}",
        f"run folder: {args.out}",
    ]
    print("\n".join(lines), flush=True)


def done(step, unreadable, out, saved, text_only):
    """The last lines of a run."""
    log(f"done: {step} steps | {len(unreadable)} records skipped because their image failed to load (another sample "
        f"was used instead; python tools/check_data.py check lists them) | "
        + (f"model in {out / 'model'}" if saved else "nothing saved") + f" | curves: python tools/plot.py {out}")
    if text_only and saved:
        log(f"to write a plain LLM folder (adapter merged, in the base model's layout): python convert.py "
            f"{out / 'model'} --to llm --out {out / 'merged'}")


# ----------------------------------------------------------------------------------------------------------------
# Progress: one line per optimizer step, metrics.jsonl, a tqdm bar


def flops_per_token(m):
    """Model FLOPs of one training position in the LLM blocks, for the mfu field: 2 per weight in forward, 2 more
    for the gradient w.r.t. the input (it flows through the whole LLM to the projector in every mode), 2 more per
    trainable weight. Left out, as usual for MFU: activation recomputation, attention scores, the lm_head (run only
    on supervised positions) and the vision tower (a few % of the work)."""
    weights = sum(sub.in_features * sub.out_features for sub in m.llm.layers.modules()
                  if isinstance(sub, (torch.nn.Linear, lora.LoRALinear)))
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in m.llm.layers.parameters() if p.requires_grad)
    return 4 * weights + 2 * trainable


class Progress:
    COMPILE_WINDOW = 4  # steps after the first whose median time stands for a compiled step

    def __init__(self, out, total_steps, start_step, flops_per_token, device, half=True, compiled=False):
        """half: bf16 or fp16 weights (mfu is against the 16-bit peak); compiled: the LLM blocks compile in the
        first step this process runs."""
        self.total, self.device, self.flops, self.half = total_steps, device, flops_per_token, half
        self.first_s, self.later_s = (None, []) if compiled else (0.0, None)
        self.peak = None
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            self.peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
            # "mem": the peak of training alone, not of loading (an NF4 LLM may pass through the GPU in bf16)
            torch.cuda.reset_peak_memory_stats(device)
        self.file = Path(out) / "metrics.jsonl"
        self.bar = None
        if rank() == 0:
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            disable=None)  # None: no bar when stderr is not a terminal (logs, tests)
        self.t = time.perf_counter()

    def step(self, step, epoch, loss, lr, gnorm, tokens, samples, loss_scale=None, applied=True):
        """Print and record one optimizer step; returns the record. loss_scale: the fp16 loss scale the step used;
        applied: False when DeepSpeed skipped the update (engine.was_step_applied())."""
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        rec = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "gnorm": gnorm, "step_s": dt,
               "tok_s": tokens / dt, "samples_s": samples / dt, "world": world(), "time": time.time()}
        line = (f"step {step}/{self.total} | loss {loss:.3f} | lr {lr:.1e} | gnorm {gnorm:.2f} | "
                f"{rec['tok_s']:,.0f} tok/s | {rec['samples_s']:.1f} samples/s")
        if self.peak and self.half:
            rec["mfu"] = self.flops * rec["tok_s"] / (world() * self.peak)
            line += f" | mfu {100 * rec['mfu']:.0f}%"
        if self.device.type == "cuda":
            rec["mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 1e9
            line += f" | mem {rec['mem_gb']:.1f} GB"
        if loss_scale is not None:
            rec["loss_scale"] = loss_scale
            line += f" | loss scale {loss_scale:,.0f}"
        if not applied:  # DeepSpeed also left the lr schedule where it was
            rec["skipped"] = True
            line += " | skipped: inf/nan gradients, no update"
        line += self.compile_note(step, dt, rec)
        if rank() == 0:
            with open(self.file, "a") as f:
                f.write(json.dumps(rec) + "\n")
            if self.bar is not None and not self.bar.disable:
                self.bar.update(1)
                self.bar.write(line)
            else:
                print(line, flush=True)
        return rec

    def compile_note(self, step, dt, rec):
        """The first step's time, and once COMPILE_WINDOW more steps ran (or the run ended), an estimate of its
        one-time cost: its time less the median of the next steps'. Empty for a run without compiled blocks."""
        if self.first_s is None:
            self.first_s = dt
            return f" | {dt:.1f} s, compiling"
        if self.later_s is None:
            return ""
        self.later_s.append(dt)
        if len(self.later_s) < self.COMPILE_WINDOW and step < self.total:
            return ""
        n, typical = len(self.later_s), sorted(self.later_s)[len(self.later_s) // 2]
        rec["compile_s"] = self.first_s - typical
        self.later_s = None
        return (f"\ncompiling: the first step took {self.first_s:.1f} s, the next {n} {typical:.1f} s each (median): "
                f"about {rec['compile_s']:.0f} s of one-time work, mostly torch.compile (--no-compile skips it)")

    def restart_clock(self):
        """Leave evaluation and checkpoint time out of the next step's throughput."""
        self.t = time.perf_counter()

    def close(self):
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------------
# Evaluation prompts


def evaluates(args):
    """Whether the run answers eval prompts: about --eval-image, or as text in a text-only run (--stage sft)."""
    return bool(args.eval_prompt) if args.stage == "sft" else args.eval_image is not None


def evaluate(engine, tok, cfg, args, step, device):
    """Answer every --eval-prompt about --eval-image (padded to square, as XTuner's hook does), or as text in a
    text-only run; rank 0 prints the answers and writes out/eval/step_N.txt."""
    m = engine.module
    text_only = cfg["vision"] is None
    img = None if text_only else clip.preprocess(clip.load_image(args.eval_image), cfg["image_size"],
                                                 pad_to_square=True)[None].to(device)
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
            ids = data.encode_prompt(tok, cfg["template"], prompt if text_only else "<image>\n" + prompt,
                                     image_tokens=cfg["image_tokens"])
            new = generate(m, [ids], img, max_new_tokens=args.eval_max_new_tokens, stop_ids=stop)
            answers.append((prompt, tok.decode(new[0])))
        m.llm.free_cache()
    m.train(was_training)
    if rank() == 0:
        text = "".join(f"[{p}]\n{a}\n\n" for p, a in answers)
        (Path(args.out) / "eval").mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "eval" / f"step_{step}.txt").write_text(text)
        log(f"--- eval at step {step} ---\n{text.rstrip()}")
    return answers

