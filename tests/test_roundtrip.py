"""The round-trip matrix: every training mode x every layout x every consumer gives the trained model's tokens.

For each LLM family (Llama-3 with its tiktoken tokenizer, InternLM2 with a sentencepiece one) and each training mode
(projector only, full LLM, full LLM + CLIP LoRA, LoRA + CLIP LoRA, QLoRA), a run's model/ folder is written the way
train.py writes it, with random nonzero trained weights. The trained model is that folder loaded by the loader; its
greedy answer about a probe picture is the reference. Each layout is then written by convert.py and read back by
each consumer from the command line with no flag beyond what the folder cannot know:

    chat.py        a stdin-driven turn about the picture    -> the same text as the trained model
    eval_mmbench   three MMBench-format questions            -> the same predictions as on the run folder
    convert.py     the layout converted again, --to hf       -> the same text again (Llama-3; InternLM2 is refused)

Layouts that cannot hold a cell are refused at write time with a message naming one that can, and the test checks
that message. Text-only runs (`--stage sft`) go through their own layouts (run, merged LLM, PEFT adapters).
"""
import base64
import io
import json
import shutil
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

import chat
import clip
import convert
import data
import eval_mmbench
import llama
import lora
import model as M
from extras import loader
from extras.hf_tokenizer import write_hf_tokenizer
from test_convert import _randomize
from test_internlm2 import hf_model, write_internlm2
from extras.tokenizer_files import load_tokenizer

QUESTION = "What is in this picture?"
MODES = {  # name: (llm_mode, vision LoRA)
    "projector": ("frozen", False), "full": ("full", False), "full+vitlora": ("full", True),
    "lora+vitlora": ("lora", True), "qlora": ("qlora", False)}
LAYOUTS = ["run", "hf", "xtuner", "official", "adapters", "llm"]


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Base folders: a tiny CLIP, a tiny Llama-3 (Meta's tokenizer) and a tiny InternLM2 (a sentencepiece model with
    InternLM2's chat tokens)."""
    import llama_models
    import sentencepiece as spm

    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    vision = clip.CLIPVisionTower(clip.CLIPConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=3,
                                                  num_heads=4, intermediate_size=64))
    _randomize(vision, 0.2)
    clip.save_clip(vision, root / "vision", dtype=torch.float32)
    llm = llama.Llama(llama.LlamaConfig(vocab_size=128_256, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                                        intermediate_size=64))
    _randomize(llm, 0.2)
    llama.save_llama(llm, root / "llama3", dtype=torch.float32)
    (root / "llama3" / "original").mkdir()
    shutil.copyfile(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model",
                    root / "llama3" / "original" / "tokenizer.model")
    write_hf_tokenizer(load_tokenizer(root / "llama3"), root / "llama3")
    write_internlm2(root / "internlm2", hf_model())
    words = "the a cat dog red blue green one two three what is in this picture colour shape".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g).tolist()) + "."
             for _ in range(300)]
    with open(root / "internlm2" / "tokenizer.model", "wb") as f:
        spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=f, model_type="bpe",
                                       vocab_size=300, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
                                       byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                       normalization_rule_name="identity", remove_extra_whitespaces=False)
    return root


def make_run(root, family, mode, folder, vision=True):
    """A run's model/ folder as train.py leaves it, its trained weights random and nonzero."""
    llm_mode, vision_lora = {**MODES, "lora": ("lora", False)}[mode]
    llm_path = root / family
    hidden = llama.LlamaConfig.from_hf_config(json.loads((llm_path / "config.json").read_text())).hidden_size
    lora_cfg = lambda targets: {"r": 4, "alpha": 8, "dropout": 0.05, "targets": targets}  # noqa: E731
    cfg = {"llm": str(llm_path), "vision": str(root / "vision") if vision else None,
           "template": "llama3_chat" if family == "llama3" else "internlm2_chat", "llm_mode": llm_mode,
           "llm_lora": lora_cfg(M.LLM_LORA_TARGETS) if llm_mode in ("lora", "qlora") else None,
           "vision_lora": lora_cfg(M.VISION_LORA_TARGETS) if vision_lora else None, "dtype": "float32"}
    if vision:
        cfg.update({"select_layer": -2, "image_mode": "pad", "image_size": 32, "image_tokens": 16,
                    "projector": {"in": 32, "hidden": hidden, "out": hidden}})
    else:
        cfg.update({"projector": None, "image_tokens": 0})
    # a seed of its own per (family, mode), the same in every process (Python's str hash is salted per process)
    torch.manual_seed(zlib.crc32(f"{family}-{mode}".encode()) % 1000)
    m = loader.build_model(cfg, dtype=torch.float32)
    if cfg["llm_lora"]:
        lora.inject_lora(m.llm, M.LLM_LORA_TARGETS, 4, 8, 0.05, nf4=llm_mode == "qlora")
    if vision_lora:
        lora.inject_lora(m.vision, M.VISION_LORA_TARGETS, 4, 8, 0.05)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "lora_" in name or name.startswith("projector.") or (llm_mode == "full" and name.startswith("llm.")):
                p.add_(torch.randn_like(p) * (0.3 if "lora_" in name else 0.1))
    loader.save_model(m, folder, cfg)
    return folder


def picture(path):
    g = Image.linear_gradient("L").resize((40, 28))
    Image.merge("RGB", (g, g.rotate(90, expand=True).resize((40, 28)), Image.new("L", (40, 28), 90))).save(path)
    return path


def answer(model, tok, cfg, image=None, n=6):
    """The trained model's greedy answer, as text: the reference every consumer must reproduce."""
    text = QUESTION if image is None else "<image>\n" + QUESTION
    ids = data.encode_prompt(tok, cfg["template"], text, image_tokens=cfg.get("image_tokens", 0),
                             images=int(image is not None))
    pixels = None if image is None else clip.preprocess(clip.load_image(image), 32)[None]
    out = M.generate(model, [ids], pixels, max_new_tokens=n, stop_ids=data.stop_token_ids(tok, cfg["template"]))[0]
    return tok.decode(out, skip_special=True).strip()


def chat_answer(model_dir, image=None, extra=()):
    out = io.StringIO()
    argv = ["--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "6", *extra]
    rc = chat.main(argv + (["--image", str(image)] if image else []), stdin=io.StringIO(QUESTION + "\n"), out=out)
    assert rc == 0, out.getvalue()
    return out.getvalue().strip()


def write_tsv(path, image):
    b64 = base64.b64encode(Path(image).read_bytes()).decode()
    rows = [["index", "question", "A", "B", "C", "category", "image", "answer"]]
    rows += [[str(i), q, "red", "green", "blue", "colour", b64, "A"]
             for i, q in enumerate(["What colour?", "Which one?", "What is shown?"])]
    path.write_text("\n".join("\t".join(r) for r in rows) + "\n")
    return path


def eval_predictions(model_dir, tsv, out, extra=()):
    eval_mmbench.main(["--model", str(model_dir), *extra, "--data", str(tsv), "--out", str(out),
                       "--max-new-tokens", "4"])
    return [json.loads(line)["prediction"] for line in (Path(out) / "predictions.jsonl").read_text().splitlines()]


REFUSED = {  # (family, layout, mode or None for all): the words the refusal must say
    ("internlm2", "hf", None): "--to xtuner",
    ("llama3", "adapters", "projector"): "no LoRA adapters",
    ("llama3", "adapters", "full"): "no LoRA adapters",
    ("internlm2", "adapters", "projector"): "no LoRA adapters",
    ("internlm2", "adapters", "full"): "no LoRA adapters",
}


@pytest.fixture(scope="module")
def runs(families, tmp_path_factory):
    """Per (family, mode): the run folder, the picture, the TSV, and the trained model's answer and predictions."""
    root = tmp_path_factory.mktemp("runs")
    image = picture(root / "probe.png")
    tsv = write_tsv(root / "probe.tsv", image)
    made = {}

    def get(family, mode):
        if (family, mode) not in made:
            run = make_run(families, family, mode, root / f"{family}-{mode}" / "model")
            model, tok, cfg = loader.load_model(run, dtype=torch.float32)
            made[family, mode] = dict(run=run, image=image, tsv=tsv, text=answer(model, tok, cfg, image),
                                      preds=eval_predictions(run, tsv, root / f"{family}-{mode}" / "eval"))
        return made[family, mode]

    return get


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("family", ["llama3", "internlm2"])
def test_every_layout_reads_back_as_trained(family, mode, layout, runs, tmp_path, capsys):
    r = runs(family, mode)
    assert r["text"], "the probe answer is empty: the matrix would compare nothing"
    if layout == "run":
        target = r["run"]
    else:
        target = tmp_path / layout
        refused = next((words for (f, lay, m), words in REFUSED.items()
                        if f == family and lay == layout and m in (None, mode)), None)
        rc = convert.main([str(r["run"]), "--to", layout, "--out", str(target), "--fp32"])
        if refused:
            assert rc == 2 and refused in capsys.readouterr().err
            return
        assert rc == 0
    extra = []
    if layout == "adapters":  # the adapters as trained, which alone are no LLaVA (no projector): every consumer
        # says so in one line and names the layout that holds the whole model
        llm_mode, vision_lora = MODES[mode]
        assert (target / "llm_adapter" / "adapter_config.json").is_file() == (llm_mode in ("lora", "qlora"))
        assert (target / "vision_adapter" / "adapter_config.json").is_file() == vision_lora
        assert chat.main(["--model", str(target)], stdin=io.StringIO(QUESTION + "\n"), out=io.StringIO()) == 2
        err = capsys.readouterr().err
        assert "--to xtuner" in err and len(err.strip().splitlines()) == 1
        return
    if layout == "llm":  # the merged LLM: a LLaVA reads it back as XTuner's merged-LLM workflow does, with the
        # projector (and a merged tower, when it trained) from XTuner's folder
        xt = tmp_path / "xtuner-for-llm"
        assert convert.main([str(r["run"]), "--to", "xtuner", "--out", str(xt), "--fp32"]) == 0
        clip_dir = tmp_path / "clip-merged"
        assert convert.main([str(r["run"]), "--to", "clip", "--out", str(clip_dir), "--fp32"]) == 0
        shutil.rmtree(xt / "llm_adapter", ignore_errors=True)
        shutil.rmtree(xt / "visual_encoder_adapter", ignore_errors=True)
        (xt / "llava.json").unlink()
        target, extra = xt / "projector", ["--llm", str(tmp_path / "llm"), "--vision", str(clip_dir)]
    got = chat_answer(target, r["image"], extra)
    assert got.endswith(r["text"]), (got, r["text"])
    assert eval_predictions(target, r["tsv"], tmp_path / "eval", extra) == r["preds"]
    if family == "llama3":
        again = tmp_path / "again-hf"
        assert convert.main([str(target), *extra, "--to", "hf", "--out", str(again), "--fp32"]) == 0
        assert chat_answer(again, r["image"]).endswith(r["text"])


@pytest.mark.parametrize("layout", ["run", "llm", "adapters"])
@pytest.mark.parametrize("mode", ["full", "lora", "qlora"])
@pytest.mark.parametrize("family", ["llama3", "internlm2"])
def test_text_only_layouts_read_back_as_trained(family, mode, layout, families, tmp_path, capsys):
    run = make_run(families, family, mode, tmp_path / "run" / "model", vision=False)
    model, tok, cfg = loader.load_model(run, dtype=torch.float32)
    want = answer(model, tok, cfg)
    target = run
    if layout != "run":
        target = tmp_path / layout
        rc = convert.main([str(run), "--to", layout, "--out", str(target), "--fp32", "--verify"])
        if layout == "adapters" and mode == "full":
            assert rc == 2 and "no LoRA adapters" in capsys.readouterr().err
            return
        assert rc == 0 and ": ok" in capsys.readouterr().out
    assert chat_answer(target).endswith(want)


def test_refusals_name_a_layout_that_works(runs, tmp_path, capsys):
    r = runs("internlm2", "lora+vitlora")
    capsys.readouterr()
    assert convert.main([str(r["run"]), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "LlavaForConditionalGeneration" in err and "--to xtuner" in err and "Traceback" not in err
    assert not (tmp_path / "hf").exists() or not any((tmp_path / "hf").iterdir())


def test_missing_base_is_one_line_not_a_traceback(runs, families, tmp_path, capsys):
    r = runs("llama3", "lora+vitlora")
    capsys.readouterr()  # the fixture's own output
    xt = tmp_path / "xt"
    assert convert.main([str(r["run"]), "--to", "xtuner", "--out", str(xt)]) == 0
    (xt / "llava.json").unlink()  # as XTuner itself writes it: nothing names the bases
    assert convert.main([str(xt), "--to", "hf", "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "--llm" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # named, it converts
    assert convert.main([str(xt), "--llm", str(families / "llama3"), "--vision", str(families / "vision"),
                         "--to", "hf", "--out", str(tmp_path / "hf2")]) == 0


def test_qlora_xtuner_export_stays_on_its_nf4_base(runs, tmp_path, capsys):
    """The adapter of a QLoRA run is applied to an NF4 base again; --bf16-base asks for the full-precision one."""
    r = runs("llama3", "qlora")
    capsys.readouterr()
    xt = tmp_path / "xt"
    assert convert.main([str(r["run"]), "--to", "xtuner", "--out", str(xt), "--fp32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "NF4 base" in out and ": ok" in out
    nf4, _, cfg = loader.load_model(xt, dtype=torch.float32)
    assert cfg["llm_mode"] == "qlora" and any(getattr(m, "nf4", False) for m in nf4.llm.modules())
    full, _, cfg = loader.load_model(xt, dtype=torch.float32, bf16_base=True)
    assert cfg["llm_mode"] == "lora" and not any(getattr(m, "nf4", False) for m in full.llm.modules())
