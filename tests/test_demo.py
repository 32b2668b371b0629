"""The demo's synthetic data and tiny base models (demo.py).

The references: the pictures' own pixels (colour, connected shapes, their corners and outlines are measured here
with numpy, independently of the generator's scene records), the MMBench TSV layout, transformers (the models
load with no missing or unexpected key and compute what our modules compute; the preprocessor config gives our
preprocessing), and Meta's tokenizer.model shipped by llama-models (byte-identical copy, golden ids).
"""

import base64
import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
import eval_mmbench
import extras.benchmarks
from extras.benchmarks import read_benchmark

SIZE = 64  # the tiny CLIP's input size, also demo's default


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_data")
    demo.write_data(out, n_pretrain=40, n_finetune=40, n_eval=64, seed=3, image_size=SIZE, n_text=4)
    return out


def read_tsv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    return rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]


def decode(b64):
    return Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))


# ---- what a picture shows, measured from its pixels ------------------------------------------------------------


def components(mask):
    """4-connected components of a boolean mask, as lists of (y, x)."""
    seen = np.zeros_like(mask)
    comps = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= yy < mask.shape[0] and 0 <= xx < mask.shape[1] and mask[yy, xx] and not seen[yy, xx]:
                    seen[yy, xx] = True
                    stack.append((yy, xx))
        comps.append(comp)
    return comps


def shape_of(comp):
    ys, xs = np.array(comp).T
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    fill = len(comp) / (h * w)
    mid = (ys.min() + ys.max()) / 2
    top, bottom = (ys < mid).sum(), (ys > mid).sum()
    if top < 0.6 * bottom:  # a triangle with its apex up holds a quarter of its area in the top half
        return "triangle"
    if fill > 0.9:
        return "square"
    if fill > 0.68:         # a disc fills pi/4 of its box, a plus sign with arms a third wide 5/9
        return "circle"
    return "cross"


def measure(img):
    """{colour, shape, count, position (or None)} of a picture, from its pixels alone."""
    a = np.asarray(img.convert("RGB")).astype(int)
    saturated = (a.max(-1) - a.min(-1)) > 60  # the backgrounds are grey, every shape colour is saturated
    comps = [c for c in components(saturated) if len(c) > 12]  # drop anti-aliasing crumbs
    if not comps:
        return {"count": 0}
    pixels = a[saturated]
    names = list(demo.COLOURS)
    dist = [np.abs(pixels - np.array(demo.COLOURS[n])).sum(-1).mean() for n in names]
    shapes = {shape_of(c) for c in comps}
    assert len(shapes) == 1, f"shapes of one picture disagree: {shapes}"
    position = None
    if len(comps) == 1:
        cy, cx = np.array(comps[0]).mean(0)
        position = ("top" if cy < a.shape[0] / 2 else "bottom") + " " + ("left" if cx < a.shape[1] / 2 else "right")
    return {"colour": names[int(np.argmin(dist))], "shape": shapes.pop(), "count": len(comps), "position": position}


def test_pixel_measure_reads_every_kind_of_scene():
    # the measuring code itself, over every shape x colour x count (so a wrong measure cannot pass the tests below)
    rng = __import__("random").Random(0)
    for shape in demo.SHAPES:
        for colour in demo.COLOURS:
            for count in (1, 2, 3, 4):
                scene = demo.random_scene(rng, shape=shape, colour=colour, count=count)
                m = measure(demo.draw(scene, SIZE))
                assert (m["shape"], m["colour"], m["count"]) == (shape, colour, count), (scene, m)
                if count == 1:
                    assert m["position"] == scene.position


# ---- determinism and files ------------------------------------------------------------------------------------


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def test_generator_is_deterministic(data_dir, tmp_path):
    demo.write_data(tmp_path / "again", n_pretrain=40, n_finetune=40, n_eval=64, seed=3, image_size=SIZE,
                    n_text=4)
    assert tree_digest(tmp_path / "again") == tree_digest(data_dir)
    demo.write_data(tmp_path / "other", n_pretrain=40, n_finetune=40, n_eval=64, seed=4, image_size=SIZE,
                    n_text=4)
    assert (tmp_path / "other" / "eval.tsv").read_bytes() != (data_dir / "eval.tsv").read_bytes()


def test_cli_writes_the_files(tmp_path):
    demo.main(["data", str(tmp_path), "--n-pretrain", "3", "--n-finetune", "5", "--n-text", "2", "--n-eval", "16"])
    for name in ("pretrain.json", "finetune.json", "eval.tsv", "eval_blank.tsv", "eval_yesno.tsv"):
        assert (tmp_path / name).stat().st_size > 0
    assert len(list((tmp_path / "images" / "pretrain").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="multiple of 16"):
        demo.write_data(tmp_path / "bad", n_pretrain=1, n_finetune=1, n_eval=10, image_size=SIZE)


def test_categories_subset(tmp_path):
    demo.write_data(tmp_path, n_pretrain=0, n_finetune=6, n_eval=8, seed=0, image_size=SIZE, n_text=0,
                    categories=["colour"])
    _, rows = read_tsv(tmp_path / "eval.tsv")
    assert Counter((r["category"], r["answer"]) for r in rows) == {("colour", L): 2 for L in "ABCD"}
    for r in json.loads((tmp_path / "finetune.json").read_text()):
        # every question is about colour, or the existence question every category shares
        questions = [t["value"] for t in r["conversations"][::2]]
        assert all("colour" in q or q.endswith(demo.YN_INSTRUCTION) for q in questions)
    with pytest.raises(ValueError, match="position alone"):
        demo.write_data(tmp_path / "bad", n_pretrain=0, n_finetune=1, n_eval=4, categories=["position"])


# ---- the benchmark ----------------------------------------------------------------------------------------------


def test_eval_tsv_is_mmbench_with_balanced_letters(data_dir):
    header, rows = read_tsv(data_dir / "eval.tsv")
    assert header == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]
    assert len(rows) == 64 and len({r["index"] for r in rows}) == 64
    assert all(r["index"].isdigit() and int(r["index"]) < 1_000_000 for r in rows)  # main rows, no circular copies
    assert {r["category"] for r in rows} == {"colour", "shape", "count", "position"}
    # every (category, letter) pair equally often: a model that always answers one letter, or one letter per
    # category, scores exactly 0.25
    assert Counter((r["category"], r["answer"]) for r in rows) == {(c, L): 4 for c in demo.CATEGORIES for L in "ABCD"}
    for r in rows:
        assert r["question"] and all(r[L] for L in "ABCD") and len({r[L] for L in "ABCD"}) == 4
        img = decode(r["image"])
        assert img.format == "PNG" and img.size == (SIZE, SIZE) and img.mode == "RGB"


def test_eval_tsv_reads_in_eval_mmbench(data_dir):
    import eval_mmbench
    questions = extras.benchmarks.read_tsv(str(data_dir / "eval.tsv"))
    assert len(questions) == 64
    prompt = eval_mmbench.build_prompt(questions[0])
    assert prompt.startswith("<image>\n") and prompt.endswith(demo.MC_INSTRUCTION)


def test_eval_answers_point_at_what_is_drawn(data_dir):
    _, rows = read_tsv(data_dir / "eval.tsv")
    for r in rows:
        m = measure(decode(r["image"]))
        truth = str(m[r["category"]])
        assert r[r["answer"]] == truth, (r["index"], r["category"], r["answer"], m)


def test_blank_control_has_the_same_questions_and_no_shapes(data_dir):
    _, rows = read_tsv(data_dir / "eval.tsv")
    _, blank = read_tsv(data_dir / "eval_blank.tsv")
    strip = lambda r: {k: v for k, v in r.items() if k != "image"}  # noqa: E731
    assert [strip(r) for r in blank] == [strip(r) for r in rows]
    for r in blank:
        assert measure(decode(r["image"]))["count"] == 0


def test_eval_pictures_are_held_out(data_dir):
    train = {hashlib.sha1(np.asarray(Image.open(p).convert("RGB")).tobytes()).hexdigest()
             for p in (data_dir / "images").rglob("*.png") if not p.name.startswith("blank-")}  # (empty pictures)
    _, rows = read_tsv(data_dir / "eval.tsv")
    held = {hashlib.sha1(np.asarray(decode(r["image"]).convert("RGB")).tobytes()).hexdigest() for r in rows}
    assert len(train) == 80 and len(held) == 64 and not train & held


# ---- training records -------------------------------------------------------------------------------------------


def words_in(text, vocab):
    return [w for w in vocab if w in text.lower()]


def test_captions_describe_the_pictures(data_dir):
    records = json.loads((data_dir / "pretrain.json").read_text())
    assert len(records) == 40
    for r in records:
        human, gpt = r["conversations"]
        assert human["from"] == "human" and human["value"].startswith("<image>\n") and gpt["from"] == "gpt"
        m = measure(Image.open(data_dir / r["image"]))
        cap = gpt["value"].lower()
        assert words_in(cap, demo.COLOURS) == [m["colour"]]
        assert cap.startswith(("a " if m["count"] == 1 else demo.COUNT_WORDS[m["count"] - 1] + " "))
        assert m["shape"] in cap
        if m["count"] == 1:
            assert m["position"] in cap


def test_finetune_answers_match_the_pictures(data_dir):
    records = json.loads((data_dir / "finetune.json").read_text())
    with_image = [r for r in records if "image" in r]
    assert len(with_image) == 42 and len(records) == 46  # 40 pictures + 40 / 20 empty ones; 4 text-only
    seen = Counter()
    for r in records:
        conv = r["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert sum("<image>" in t["value"] for t in conv) == (1 if "image" in r else 0)
        if "image" not in r:
            continue
        assert conv[0]["value"].startswith("<image>\n")
        m = measure(Image.open(data_dir / r["image"]))
        for q, a in zip(conv[::2], conv[1::2]):
            q, a = q["value"].removeprefix("<image>\n"), a["value"]
            if q.endswith(demo.MC_INSTRUCTION):  # MMBench's prompt: options "A. ..." then the instruction
                options = dict(line.split(". ", 1) for line in q.split("\n") if line[1:3] == ". ")
                category = next(c for c, text in demo.MC_QUESTIONS.items() if text in q)
                assert options[a] == str(m[category]), (r["id"], q, a, m)
                seen["mc"] += 1
            elif q.endswith(demo.YN_INSTRUCTION):  # "Is there a shape in the image? Please answer yes or no."
                assert a == ("Yes." if m["count"] else "No."), (r["id"], q, a, m)
                seen["yesno"] += 1
            elif m["count"] == 0:                   # an empty picture: its other questions cannot be answered
                assert a in ("None.", "There are no shapes."), (r["id"], q, a)
                seen["blank"] += 1
            elif "colour" in q:
                assert a.lower().rstrip(".") == m["colour"]
            elif "How many" in q or "Count" in q:
                assert a.lower().rstrip(".") == demo.COUNT_WORDS[m["count"] - 1]
            elif "corner" in q or "Where" in q:
                assert m["position"] in a
            else:
                assert m["shape"] in a.lower()
            seen["turns"] += 1
    assert seen["mc"] > 0.3 * seen["turns"] and seen["yesno"] > 0 and seen["blank"] > 0


def test_yes_no_benchmark_asks_if_a_picture_and_its_blank_show_a_shape(data_dir):
    _, rows = read_tsv(data_dir / "eval_yesno.tsv")
    _, mc = read_tsv(data_dir / "eval.tsv")
    assert len(rows) == 2 * 64 and [r["index"] for r in rows] == [str(i) for i in range(128)]
    assert Counter((r["category"], r["answer"]) for r in rows) == {("drawn", "Yes"): 64, ("blank", "No"): 64}
    assert {r["answer"] for r in rows[::2]} == {"Yes", "No"}  # which one comes first is drawn at random
    for (first, second), picture in zip(zip(rows[::2], rows[1::2]), mc):
        drawn = first if first["answer"] == "Yes" else second
        blank = second if drawn is first else first
        assert drawn["image"] == picture["image"] and measure(decode(blank["image"]))["count"] == 0
        for r in (first, second):
            assert r["question"].endswith(demo.YN_INSTRUCTION)
    bench = read_benchmark(data_dir / "eval_yesno.tsv")
    assert (bench.kind, bench.rules) == ("yorn", "yorn")
    assert eval_mmbench.build_prompt(bench.questions[0], "yorn") == "<image>\n" + rows[0]["question"]


# ---- tiny models ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo_models")
    demo.write_models(out, seed=0)
    return out


def test_models_load_in_transformers(models_dir):
    import transformers

    import clip
    import llama

    hf_llm, info = transformers.LlamaForCausalLM.from_pretrained(models_dir / "llm", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched key
    assert hf_llm.config.vocab_size == 128256
    ours = llama.load_llama(models_dir / "llm", dtype=torch.float32)
    ids = torch.tensor([[128000, 9906, 1917, 128009]])
    with torch.no_grad():
        torch.testing.assert_close(ours.lm_head(ours(input_ids=ids)), hf_llm(ids).logits, atol=1e-4, rtol=1e-4)

    hf_vis, info = transformers.CLIPVisionModel.from_pretrained(models_dir / "vision", output_loading_info=True)
    assert not any(info.values()), info
    tower = clip.load_clip(models_dir / "vision")
    img = demo.draw(demo.random_scene(__import__("random").Random(1)), tower.cfg.image_size)
    proc = transformers.CLIPImageProcessor.from_pretrained(models_dir / "vision")
    px = proc(images=img, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(px[0], clip.preprocess(img, tower.cfg.image_size), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        ref = hf_vis(pixel_values=px, output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(tower(px, select_layer=-2), ref, atol=1e-4, rtol=1e-4)


def test_models_are_seeded(models_dir, tmp_path):
    demo.write_models(tmp_path, seed=0)
    for sub in ("vision", "llm"):
        written = (tmp_path / sub / "model.safetensors").read_bytes()
        assert written == (models_dir / sub / "model.safetensors").read_bytes()


def test_tokenizer_is_metas_llama3(models_dir):
    import llama_models

    from extras.tokenizer_files import load_tokenizer
    copied = models_dir / "llm" / "original" / "tokenizer.model"
    shipped = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert copied.read_bytes() == shipped.read_bytes() and copied.stat().st_size == 2_183_982
    tok = load_tokenizer(models_dir / "llm")
    assert tok.vocab_size == 128256
    assert tok.encode("Hello world") == [9906, 1917]       # Llama-3's ids for "Hello" and " world"
    assert tok.special("<|begin_of_text|>") == 128000 and tok.special("<|eot_id|>") == 128009


# ---- end to end: the trained model reads the pictures -----------------------------------------------------------


def test_demo_pipeline_learns_from_the_pictures(tmp_path):
    """A short `make demo` on colour questions alone (the quickest category to learn): finetune the tiny models,
    then run the benchmark on the real pictures and on the blank control. The control asks the same questions with
    nothing to see, so it must score near chance (0.25, the letters being balanced); the real pictures far above.
    (The full demo, all four categories and 500 steps: Average 0.94 against 0.24; see recipes/demo-finetune.args.)"""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    data_dir, runs = tmp_path / "data", tmp_path / "runs"
    demo.write_data(data_dir, n_pretrain=0, n_finetune=16 * E2E_STEPS, n_eval=32, seed=1, n_text=0,
                    categories=["colour"])
    demo.write_models(data_dir / "models", seed=0)
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}

    def run(*args):
        r = subprocess.run([sys.executable, *args], cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"

    run("train.py", "@recipes/demo-finetune.args", "--llm", str(data_dir / "models" / "llm"),
        "--vision", str(data_dir / "models" / "vision"), "--data", str(data_dir / "finetune.json"),
        "--image-folder", str(data_dir), "--init-from", "", "--out", str(runs / "finetune"))
    scores = {}
    for name in ("eval", "eval_blank"):
        run("eval_mmbench.py", "--data", str(data_dir / f"{name}.tsv"), "--model", str(runs / "finetune" / "model"),
            "--out", str(runs / name), "--batch-size", "32")
        scores[name] = json.loads((runs / name / "mmbench_result.json").read_text())["Average"]
    assert scores["eval_blank"] <= 0.4, scores
    assert scores["eval"] >= 0.75, scores


E2E_STEPS = 100  # one epoch of 16-picture steps
