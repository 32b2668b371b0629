"""Shared pieces of the benchmarks: the real shapes, random models built straight on the device, batches, timing,
FLOP counts and the one-JSON-line-per-result output.

Both sides of every benchmark are built here from the same configs, so "ours" and "HF" always run the same shapes:
CLIP ViT-L/14-336 (576 patches of width 1024) + Llama-3-8B, or their `tiny` sizes with `--tiny` (CPU debugging).
Weights are random: speed and memory do not depend on their values (norms are ones, everything else N(0, 0.02)).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project's flat modules

import clip   # noqa: E402
import llama  # noqa: E402
import model as M  # noqa: E402

HF_IMAGE_TOKEN = 128011  # a reserved Llama-3 special id: HF LLaVA marks image positions with an id inside the vocab
H100_BF16_PEAK = 989.4e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA datasheet); the MFU denominator


def parse_args(extra=None):
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "hf"], required=True)
    p.add_argument("--tiny", action="store_true", help="tiny CLIP + tiny Llama on CPU: for debugging the script")
    p.add_argument("--out", default=os.environ.get("BENCH_OUT", ""), help="append JSON lines to this file")
    p.add_argument("--tag", default="", help="names a variant run beside the main one (kept out of the ratios)")
    if extra:
        extra(p)
    args = p.parse_args()
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    return args


def configs(tiny):
    return (clip.CLIPConfig.from_name("tiny" if tiny else "clip-vit-l-14-336"),
            llama.LlamaConfig.from_name("tiny" if tiny else "llama-3-8b"))


def random_init_(module):
    """Norm weights 1, biases 0, every other tensor N(0, 0.02), in place (on whatever device the module lives)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1 and ("norm" in name or "layrnorm" in name):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)


def build_ours(tiny, device, dtype=torch.bfloat16):
    """Our LLaVA with random weights, built on the meta device and materialised on `device` in `dtype` directly
    (an 8B random init on the CPU takes minutes; on the GPU it takes a fraction of a second)."""
    vcfg, lcfg = configs(tiny)
    with torch.device("meta"):
        net = M.LLaVA(clip.CLIPVisionTower(vcfg), M.Projector(vcfg.hidden_size, lcfg.hidden_size), llama.Llama(lcfg))
    net = net.to(dtype=dtype).to_empty(device=device)
    random_init_(net)
    net.llm.init_rope(device)
    return net


def hf_config(tiny):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vcfg, lcfg = configs(tiny)
    v = {k: val for k, val in vcfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    t = {k: val for k, val in lcfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**v), text_config=LlamaConfig(**t),
                      image_token_id=HF_IMAGE_TOKEN, vision_feature_layer=-2,
                      vision_feature_select_strategy="default", projector_hidden_act="gelu")
    cfg.text_config.use_cache = False
    return cfg


def build_hf(tiny, device, dtype=torch.bfloat16):
    """transformers' LlavaForConditionalGeneration with SDPA attention and random weights, built on `device`."""
    from transformers import LlavaForConditionalGeneration

    cfg = hf_config(tiny)
    with torch.device(device):
        net = LlavaForConditionalGeneration._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    random_init_(net)
    return net


def hf_language_model(net):
    """The LlamaModel inside an HF LLaVA (transformers 5 keeps it at model.model.language_model)."""
    inner = getattr(net, "model", net)
    return getattr(inner, "language_model", None) or inner.model.language_model


def sample_ids(n_image_tokens, n_text, n_supervised, batch, vocab, device, image_id, prefix=5, seed=0):
    """input_ids and labels (B, prefix + P + n_text) of a LLaVA sample: `prefix` template tokens, one image
    (P positions of `image_id`), then text whose last `n_supervised` tokens are the supervised answer."""
    g = torch.Generator().manual_seed(seed)
    T = prefix + n_image_tokens + n_text
    ids = torch.randint(1000, vocab - 1000, (batch, T), generator=g)
    ids[:, prefix:prefix + n_image_tokens] = image_id
    labels = torch.full_like(ids, M.IGNORE_INDEX)
    labels[:, T - n_supervised:] = ids[:, T - n_supervised:]
    return ids.to(device), labels.to(device)


def pixels(n, size, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g).to(device=device, dtype=dtype)


# ---- timing and memory -----------------------------------------------------------------------------------------


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def now(device):
    sync(device)
    return time.perf_counter()


def reset_peak(device):
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device):
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else float("nan")


def emit(args, **rec):
    """Print one result as a JSON line (and append it to --out)."""
    rec = {"side": args.side, "tiny": args.tiny, "device": device_name(args.device), "tag": args.tag, **rec}
    line = json.dumps(rec)
    print("RESULT " + line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


def device_name(device):
    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def versions():
    """Versions of the packages this process imported (importing the others would only cost start-up time)."""
    return {name: sys.modules[name].__version__ for name in ("torch", "transformers", "peft", "bitsandbytes")
            if name in sys.modules}


# ---- FLOPs -----------------------------------------------------------------------------------------------------


def llm_linear_params(lcfg):
    C, D = lcfg.hidden_size, lcfg.head_dim
    attn = C * (lcfg.num_heads * D) * 2 + C * (lcfg.num_kv_heads * D) * 2
    return lcfg.num_layers * (attn + 3 * C * lcfg.intermediate_size)


def pretrain_model_flops(tiny, batch, T, n_supervised):
    """Useful FLOPs of one pretrain step (frozen CLIP and LLM, projector trained), counted once, no recomputation:
    CLIP forward through the 23 layers used; projector forward + backward (weights trained: 3x forward); LLM
    forward + input-gradient backward (2x forward: no weight gradients) incl. causal attention; lm_head on the
    supervised positions (forward + input gradient). Both sides are divided by this same number."""
    vcfg, lcfg = configs(tiny)
    Cv, P = vcfg.hidden_size, vcfg.num_patches
    n_layers_v = vcfg.num_layers - 1
    clip_fwd = n_layers_v * (2 * (4 * Cv * Cv + 2 * Cv * vcfg.intermediate_size) * (P + 1) + 4 * (P + 1) ** 2 * Cv)
    proj = 3 * 2 * P * (Cv * lcfg.hidden_size + lcfg.hidden_size ** 2)
    llm_fwd = 2 * llm_linear_params(lcfg) * T + 2 * lcfg.num_layers * T * T * lcfg.hidden_size  # causal: T^2/2 pairs
    head = 4 * lcfg.vocab_size * lcfg.hidden_size * n_supervised
    return batch * (clip_fwd + proj + 2 * llm_fwd + head)


def profile(fn, device, label, rows=15):
    """Run fn once under torch.profiler and print the ops that took the most device (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile as prof

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    t = now(device)
    with prof(activities=acts) as p:
        fn()
        sync(device)
    wall = now(device) - t
    key = "device_time_total" if device == "cuda" else "cpu_time_total"
    print(f"\n==== profile: {label}: wall {wall * 1e3:.1f} ms under the profiler (device time: the last line) ====")
    print(p.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60), flush=True)
