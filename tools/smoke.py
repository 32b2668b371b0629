"""Smoke checks of the two towers, on random tiny models or on real HF checkpoints.

    python tools/smoke.py clip [HF_CLIP_FOLDER [IMAGE]]   # pixels -> layer -2 features (CLS dropped), last, pooled
    python tools/smoke.py llama                           # the tiny Llama's KV-cache decode equals a full forward
"""

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

# run as a script, Python puts tools/ on sys.path, not the project root that holds the modules imported below
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clip  # noqa: E402
import llama  # noqa: E402


def smoke_clip(folder=None, image=None):
    if folder:
        model = clip.load_clip(folder)
        print(f"loaded {folder}: {model.cfg}")
    else:
        model = clip.CLIPVisionTower(clip.CLIPConfig.from_name("tiny")).eval()
        print(f"random tiny tower: {model.cfg}")
    S = model.cfg.image_size
    if image:
        img = clip.load_image(image)
    else:
        img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (S // 2, S + 7, 3), dtype=np.uint8))
    pixels = clip.preprocess(img, S)[None]  # (1, 3, S, S)
    with torch.no_grad():
        feats = model(pixels)  # (1, P, C)
        last, pooled = model.final(pixels)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} params | image {img.size} -> pixels {tuple(pixels.shape)} -> features "
          f"{tuple(feats.shape)} (layer -2, CLS dropped) | last {tuple(last.shape)} pooled {tuple(pooled.shape)}")
    assert feats.shape == (1, model.cfg.num_patches, model.cfg.hidden_size) and torch.isfinite(feats).all()


def smoke_llama():
    model = llama.Llama(llama.LlamaConfig.from_name("tiny")).eval()
    print(model.cfg, f"\n{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 12))
    model.setup_cache(batch=2, max_len=16)
    with torch.no_grad():
        full = model.lm_head(model(ids))  # (B, T, V)
        steps = [model.lm_head(model(ids[:, :8], cache_pos=torch.arange(8)))]  # prefill 8, then decode 4
        steps += [model.lm_head(model(ids[:, t:t + 1], cache_pos=torch.tensor([t]))) for t in range(8, 12)]
    diff = (torch.cat(steps, dim=1) - full).abs().max().item()
    print(f"logits {tuple(full.shape)}; prefill + decode vs full forward: max |diff| = {diff:.2e}")
    assert diff < 1e-5


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("clip", "llama"):
        sys.exit(__doc__)
    torch.manual_seed(0)
    if sys.argv[1] == "clip":
        smoke_clip(*sys.argv[2:4])
    else:
        smoke_llama()
    print("ok")
