"""clip.py against transformers: CLIPVisionModel parity, checkpoint loading rules, save round trip, preprocessing.

The preprocessing reference is transformers' PIL-based processor. In the installed transformers (5.x)
`CLIPImageProcessor` is the torchvision backend; the PIL / NumPy path that transformers 4.x called
`CLIPImageProcessor` (and that XTuner ran) is `CLIPImageProcessorPil`, used here with the openai-336 settings.
XTuner's own steps in front of it (`Image.open(...).convert("RGB")`, `expand2square`) are written out in this file.
"""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPConfig as HFCLIPConfig
from transformers import CLIPModel, CLIPVisionConfig, CLIPVisionModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

import clip
import weights

TOL = 1e-5


def hf_vision(image_size=32, patch_size=8, hidden=32, layers=3, heads=4, seed=0):
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=heads, image_size=image_size, patch_size=patch_size,
                           layer_norm_eps=1e-6)
    return CLIPVisionModel(cfg).eval()


def pixels(n, size, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_parity(ours, hf, x):
    with torch.no_grad():
        ref = hf(x, output_hidden_states=True)
        for sel in range(-len(ref.hidden_states), len(ref.hidden_states)):
            d = (ours(x, select_layer=sel) - ref.hidden_states[sel][:, 1:]).abs().max().item()
            assert d <= TOL, f"select_layer {sel}: max diff {d}"
        last, pooled = ours.final(x)
    assert (last - ref.last_hidden_state).abs().max().item() <= TOL
    assert (pooled - ref.pooler_output).abs().max().item() <= TOL


# ----------------------------------------------------------------------------------------------------------------
# Model parity


@pytest.mark.parametrize("geometry", [dict(image_size=32, patch_size=8),  # 16 patches
                                      dict(image_size=336, patch_size=14, hidden=32, layers=2)])  # 576, like L/14-336
def test_parity_with_hf(tmp_path, geometry):
    hf = hf_vision(**geometry)
    hf.save_pretrained(tmp_path)
    ours = clip.load_clip(tmp_path)
    assert ours.cfg.layer_norm_eps == 1e-6 and ours.cfg.num_patches == (geometry["image_size"] // geometry["patch_size"]) ** 2
    x = pixels(2, geometry["image_size"])
    assert_parity(ours, hf, x)
    assert ours(x).shape == (2, ours.cfg.num_patches, ours.cfg.hidden_size)


def test_later_layers_are_not_run(tmp_path):
    hf = hf_vision(layers=3)
    hf.save_pretrained(tmp_path)
    ours = clip.load_clip(tmp_path)
    calls = [0] * 3
    for i, layer in enumerate(ours.layers):
        layer.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
    ours(pixels(1, 32), select_layer=-2)
    assert calls == [1, 1, 0]
    ours(pixels(1, 32), select_layer=0)
    assert calls == [1, 1, 0]
    with pytest.raises(ValueError, match="select_layer"):
        ours(pixels(1, 32), select_layer=-5)
    with pytest.raises(ValueError, match="32x32"):
        ours(pixels(1, 40))


def test_activation_checkpointing_same_grads(tmp_path):
    hf_vision().save_pretrained(tmp_path)
    ours = clip.load_clip(tmp_path).train()
    x = pixels(2, 32)
    grads = []
    for ckpt in (False, True):
        ours.activation_checkpointing = ckpt
        ours.zero_grad()
        ours(x).square().sum().backward()
        grads.append(ours.layers[0].mlp.fc1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_full_clip_model_checkpoint_drops_text(tmp_path):
    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    text = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    full = CLIPModel(HFCLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    full.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    assert any(k.startswith("text_model.") for k in sd) and {"logit_scale", "text_projection.weight"} <= set(sd)
    # older transformers also saved the position_ids buffers: they must be dropped too, not rejected
    sd["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    sd["text_model.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = clip.load_clip(tmp_path)
    assert ours.cfg == clip.CLIPConfig.from_hf_config(vision)
    assert_parity(ours, full.vision_model, pixels(2, 32))


def _write_variant(src, dst, edit):
    """Copy a saved CLIPVisionModel folder with its state dict edited (keys get the hub's `vision_model.` level)."""
    dst.mkdir()
    with safe_open(src / "model.safetensors", "pt") as f:
        sd = {"vision_model." + k: f.get_tensor(k) for k in f.keys()}
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text((src / "config.json").read_text())


@pytest.mark.parametrize("edit, what, key", [
    (lambda sd: sd.pop("vision_model.encoder.layers.1.mlp.fc2.bias"), "missing", "layers.1.mlp.fc2.bias"),
    (lambda sd: sd.__setitem__("vision_model.encoder.layers.0.adapter.weight", torch.zeros(2)), "unexpected",
     "vision_model.encoder.layers.0.adapter.weight"),
    (lambda sd: sd.__setitem__("vision_model.unknown_head.weight", torch.zeros(2)), "unexpected",
     "vision_model.unknown_head.weight"),
    (lambda sd: sd.__setitem__("vision_model.encoder.layers.0.self_attn.q_proj.weight", torch.zeros(32, 31)),
     "wrong shape", "vision_model.encoder.layers.0.self_attn.q_proj.weight"),
])
def test_bad_checkpoints_name_the_key(tmp_path, edit, what, key):
    hf_vision(layers=2).save_pretrained(tmp_path / "good")
    _write_variant(tmp_path / "good", tmp_path / "bad", lambda sd: None)
    clip.load_clip(tmp_path / "bad")  # the unedited copy (hub-style keys) loads
    _write_variant(tmp_path / "good", tmp_path / "bad2", edit)
    with pytest.raises(weights.CheckpointError) as e:
        clip.load_clip(tmp_path / "bad2")
    assert what in str(e.value) and key in str(e.value)


def test_sharded_checkpoint(tmp_path):
    hf = hf_vision(hidden=64, layers=3)
    hf.save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    assert_parity(clip.load_clip(tmp_path), hf, pixels(2, 32))


def test_save_clip_round_trip(tmp_path):
    hf = hf_vision()
    hf.save_pretrained(tmp_path / "src")
    ours = clip.load_clip(tmp_path / "src")
    clip.save_clip(ours, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["CLIPVisionModel"] and cfg["model_type"] == "clip_vision_model"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert all(k.startswith("vision_model.") for k in f.keys())
    back, info = CLIPVisionModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    x = pixels(2, 32)
    with torch.no_grad():
        a, b = hf(x, output_hidden_states=True), back.eval()(x, output_hidden_states=True)
    for name in ("last_hidden_state", "pooler_output"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])
    # bf16 export loads back as bf16 through our loader and through transformers
    clip.save_clip(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    assert clip.load_clip(tmp_path / "bf16", dtype=None).embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert CLIPVisionModel.from_pretrained(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


def test_configs():
    big = clip.CLIPConfig.from_name("clip-vit-l-14-336")
    assert (big.image_size, big.patch_size, big.hidden_size, big.num_layers, big.num_heads, big.intermediate_size,
            big.num_patches) == (336, 14, 1024, 24, 16, 4096, 576)
    tiny = clip.CLIPConfig.from_name("tiny")
    assert tiny.num_patches >= 16 and tiny.image_size <= 64
    assert clip.CLIPConfig.from_hf_config(big.to_hf_config()) == big
    assert clip.CLIPConfig.from_hf_config({"vision_config": big.to_hf_config(), "text_config": {}}) == big
    with pytest.raises(ValueError, match="hidden_act"):
        clip.CLIPConfig.from_hf_config({"hidden_act": "gelu"})
    # the L/14-336 structure equals HF's, key for key and shape for shape (built on meta: no memory)
    with torch.device("meta"):
        hf = CLIPVisionModel(CLIPVisionConfig(**big.to_hf_config()))
        ours = clip.CLIPVisionTower(big)
    hf_shapes = {weights.map_key("vision_model." + k, clip.HF_KEYS): tuple(v.shape) for k, v in hf.state_dict().items()}
    hf_shapes.pop(None, None)
    assert hf_shapes == {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 303_507_456


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing


S = 336
HF_PROCESSOR = CLIPImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, resample=3,
                                     do_resize=True, do_center_crop=True, do_rescale=True, rescale_factor=1 / 255,
                                     do_normalize=True, image_mean=list(clip.CLIP_MEAN), image_std=list(clip.CLIP_STD))


def xtuner_expand2square(img, color):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (side - h) // 2) if w > h else ((side - w) // 2, 0))
    return out


def reference(rgb, pad):
    """XTuner's LLaVADataset: (expand2square with int(mean * 255)) then the HF processor."""
    if pad:
        rgb = xtuner_expand2square(rgb, tuple(int(m * 255) for m in HF_PROCESSOR.image_mean))
    return torch.from_numpy(HF_PROCESSOR.preprocess(rgb, return_tensors="np")["pixel_values"][0])


def unnormalise(x):  # back to [0, 1] pixel units, where the tolerance 1/255 is one 8-bit step
    return x * torch.tensor(clip.CLIP_STD)[:, None, None] + torch.tensor(clip.CLIP_MEAN)[:, None, None]


def smooth(w, h, seed=0):
    """A random but smooth picture (a few sinusoids), so that sub-pixel shifts change it little."""
    r = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    chans = [127 + 120 * np.sin(r.uniform(1, 6) * xx + r.uniform(1, 6) * yy + r.uniform(0, 6)) for _ in range(3)]
    return Image.fromarray(np.stack(chans, -1).round().astype(np.uint8))


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(img, fmt):
    b = io.BytesIO()
    img.save(b, fmt)
    b.seek(0)
    return b


def mode_files():
    """(name, file bytes, XTuner's RGB of it) for every mode the brief lists; 16-bit gets the documented scaling."""
    base = noise(53, 31)
    rgba = base.copy()
    rgba.putalpha(Image.fromarray(np.random.default_rng(2).integers(0, 256, (31, 53), dtype=np.uint8)))
    files = {"RGB": encode(base, "PNG"), "RGBA": encode(rgba, "PNG"), "L": encode(base.convert("L"), "PNG"),
             "LA": encode(rgba.convert("LA"), "PNG"), "P": encode(base.convert("P"), "PNG"),
             "CMYK": encode(base.convert("CMYK"), "TIFF"), "JPEG": encode(base, "JPEG")}
    out = [(name, f, Image.open(io.BytesIO(f.getvalue())).convert("RGB")) for name, f in files.items()]
    deep = np.random.default_rng(3).integers(0, 65536, (31, 53), dtype=np.uint16)
    scaled = Image.fromarray(np.rint(deep / 257).astype(np.uint8)).convert("RGB")  # the rule load_image documents
    out.append(("I;16", encode(Image.fromarray(deep), "PNG"), scaled))
    out.append(("I", encode(Image.fromarray(deep.astype(np.int32)), "TIFF"), scaled))
    return out


@pytest.mark.parametrize("pad", [True, False], ids=["pad", "crop"])
def test_modes_match_xtuner(pad):
    for name, f, rgb in mode_files():
        img = clip.load_image(f)
        assert img.mode == "RGB" and img.size == (53, 31), name
        assert np.array_equal(np.asarray(img), np.asarray(rgb)), name
        ours, ref = clip.preprocess(img, S, pad_to_square=pad), reference(rgb, pad)
        assert ours.dtype == torch.float32 and ours.shape == (3, S, S)
        assert (unnormalise(ours) - unnormalise(ref)).abs().max() <= 1 / 255, name
        assert torch.equal(ours, ref), name  # in fact bit-exact: same PIL resize, same float ops


def test_16bit_is_scaled_not_clipped():
    deep = np.full((4, 4), 32896, np.uint16)  # mid grey in 16 bits
    img = clip.load_image(encode(Image.fromarray(deep), "PNG"))
    assert np.asarray(img).max() == 128  # PIL's own convert("RGB") would give 255 (clipped)


SIZES = [(500, 300), (300, 500), (500, 333), (37, 50), (336, 336), (337, 335), (1000, 20), (20, 1000), (1, 1), (1, 7),
         (3000, 2)]  # (500, 333): 336 * 500 / 333 = 504.5, which HF truncates to 504


@pytest.mark.parametrize("size, pad", [(s, True) for s in SIZES] +
                         [(s, False) for s in SIZES if max(s) <= clip.MAX_ASPECT * min(s)])  # beyond: next test
def test_sizes_match_hf(size, pad):
    rgb = noise(*size, seed=size[0] * 7 + size[1])
    assert torch.equal(clip.preprocess(rgb, S, pad_to_square=pad), reference(rgb, pad))


def test_degenerate_crop_mode():
    # 4x1200 (300:1) would need a 336 x 100800 intermediate; we cut it to 64:1 first: same picture, sub-pixel shift
    img = smooth(1200, 4)
    d = (unnormalise(clip.preprocess(img, S, pad_to_square=False)) - unnormalise(reference(img, False))).abs()
    assert d.max() <= 3 / 255 and d.mean() <= 1 / 255
    for w, h in ((100_000, 1), (1, 100_000)):
        x = clip.preprocess(Image.new("RGB", (w, h), (10, 200, 30)), S, pad_to_square=False)
        assert x.shape == (3, S, S) and torch.allclose(unnormalise(x)[:, S // 2, S // 2],
                                                       torch.tensor([10, 200, 30]) / 255, atol=1e-6)


def test_degenerate_pad_mode(monkeypatch):
    monkeypatch.setattr(clip, "MAX_PAD_SIDE", 1024)  # keep the test light; the rule is the same at 8192
    # 5000 x 1: shrinking to 1024 x 0.2 would lose the row: the short side is kept at 1 px
    x = clip.preprocess(Image.new("RGB", (5000, 1), (250, 0, 0)), S, pad_to_square=True)
    mean = torch.tensor(clip.MEAN_RGB) / 255
    assert x.shape == (3, S, S) and torch.allclose(unnormalise(x)[:, 0, 0], mean, atol=1e-6)  # padding
    assert unnormalise(x)[0, S // 2].max() > mean[0] + 0.05  # the red line survives, blurred
    # a long image is shrunk before padding: close to the exact result on a smooth picture (the largest
    # differences sit on the two rows where the picture meets the padding, which moves by under a pixel)
    img = smooth(2000, 300)
    d = (unnormalise(clip.preprocess(img, S)) - unnormalise(reference(img, True))).abs()
    assert d.max() <= 10 / 255 and d.mean() <= 0.2 / 255


def test_bad_images():
    with pytest.raises(clip.ImageError, match="nope.png"):
        clip.load_image("/nonexistent/nope.png")
    garbage = io.BytesIO(b"not an image at all")
    with pytest.raises(clip.ImageError, match="cannot read image"):
        clip.load_image(garbage)
    truncated = io.BytesIO(encode(noise(64, 64), "JPEG").getvalue()[:300])
    with pytest.raises(clip.ImageError):
        clip.load_image(truncated)
    with pytest.raises(clip.ImageError, match="no pixels"):
        clip.preprocess(Image.new("RGB", (0, 5)), S)


def test_mean_colour_and_constants():
    assert clip.MEAN_RGB == (122, 116, 104)
    assert tuple(HF_PROCESSOR.image_mean) == clip.CLIP_MEAN and tuple(HF_PROCESSOR.image_std) == clip.CLIP_STD
    img = noise(40, 10)
    assert np.array_equal(np.asarray(clip.expand2square(img)), np.asarray(xtuner_expand2square(img, clip.MEAN_RGB)))
