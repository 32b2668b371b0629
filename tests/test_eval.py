"""eval_mmbench.py and extras/mmbench.py: TSV reading, the prompt, letter extraction, CircularEval scoring, bad rows,
--score, resume, batching and data-parallel sharding.

Expected values are written by hand from the rules of XTuner's `xtuner mmbench`, never captured from our own output.
Most tests need no model: main() takes the model loader as an argument, and a fake generator answers from the prompt
and the image.
"""

import base64
import csv
import io
import json
import multiprocessing
import os
import re
import socket

import pytest
from PIL import Image

import eval_mmbench as ev
import extras.mmbench as mm
from eval_mmbench import build_prompt
from extras.benchmarks import Question, read_tsv
from extras.mmbench import EvalError, extract_choice

EN = "Answer with the option's letter from the given choices directly."
CN = "请直接回答选项字母。"
ABCD = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


# ---- helpers -------------------------------------------------------------------------------------------------------

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def png_b64(colour, size=(5, 3)):
    buf = io.BytesIO()
    Image.new("RGB", size, COLOURS[colour]).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def colour_of(img):
    rgb = img.getpixel((0, 0))
    return next(name for name, c in COLOURS.items() if c == rgb)


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


HEADER = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "l2-category", "image"]


def dev_rows():
    """A small dev TSV. The fake generator answers "The answer is X" where X is the letter whose option text is the
    image's colour, except where a row's question says "WRONG" (then it answers the next letter)."""
    red, blue = png_b64("red"), png_b64("blue")
    return [
        # main 1 and its circular copies (options rotated): all right -> main 1 right
        [1, "Colour?", "", "red", "green", "blue", "", "A", "perc", "coarse_perception", red],
        [1000001, "Colour?", "", "green", "blue", "red", "", "C", "perc", "coarse_perception", "1"],
        [2000001, "Colour?", "", "blue", "red", "green", "", "B", "perc", "coarse_perception", "1"],
        # main 2: right, but one copy wrong -> main 2 wrong
        [2, "Colour?", "A hint.", "green", "red", "", "", "B", "perc", "coarse_perception", red],
        [1000002, "Colour? WRONG", "", "red", "green", "", "", "A", "perc", "coarse_perception", "2"],
        # main 3: Chinese question, image given as a reference to row 2 (red), options C/D missing
        [3, "这是什么颜色？", "", "green", "red", "", "", "B", "cn", "logic_reasoning", "2"],
        # main 4: corrupt base64 -> reported, scored wrong
        [4, "Colour?", "", "blue", "green", "", "", "B", "perc", "logic_reasoning", "!!!not-an-image-at-all!!!"],
        # main 5: plain right answer with a hint
        [5, "Colour?", "Look closely.", "red", "green", "blue", "", "C", "perc", "logic_reasoning", blue],
    ]


# main results: 1 right, 2 wrong (copy), 3 right, 4 wrong (bad image), 5 right
# CP = {1, 2} -> 1/2; LR = {3, 4, 5} -> 2/3; Average = 3/5
EXPECTED = {"Average": 3 / 5, "CP": 1 / 2, "LR": 2 / 3}


def parse_options(prompt):
    return {line[0]: line[3:] for line in prompt.split("\n") if len(line) > 3 and line[1:3] == ". "}


def fake_generate(prompts, images, calls=None):
    out = []
    for p, img in zip(prompts, images):
        opts = parse_options(p)
        letter = next(k for k, v in opts.items() if v == colour_of(img))
        if "WRONG" in p:
            letter = chr(ord(letter) + 1)
        out.append(f"The answer is {letter}.")
        if calls is not None:
            calls.append(p)
    return out


def fake_loader(calls=None, batches=None):
    def load(args, device, dtype):
        def gen(prompts, images):
            if batches is not None:
                batches.append(len(prompts))
            return fake_generate(prompts, images, calls)
        return gen, {"template": "llama3_chat", "image_size": 336, "image_tokens": 576}
    return load


def failing_loader(*args, **kwargs):
    raise AssertionError("the model loader must not be called")


@pytest.fixture
def dev_tsv(tmp_path):
    (tmp_path / "model").mkdir()
    return write_tsv(tmp_path / "MMBench_DEV_EN.tsv", HEADER, dev_rows())


# ---- letter extraction ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("B", "B"), ("B.", "B"), ("(B)", "B"), ("[C]", "C"), ("b", "B"), ("  D  ", "D"),  # rule 1: bare letter
    ("Answer: B", "B"), ("The answer is B", "B"), ("The answer is (C).", "C"), ("The correct option is D", "D"),
    ("answer: b.", "B"), ("答案是B", "B"), ("答案：C", "C"),                            # rule 2: answer phrase
    ("the answer is a dog", "B"),            # lowercase 'a' before a word is the article; the text names option B
    ("B) a dog", "B"), ("C. bird", "C"), ("(D): fish", "D"),                           # rule 3: leading letter
    ("I pick **C** here", "C"), ("A is correct", "A"), ("选B", "B"),                   # rule 4: standalone letters
    ("A or B", ""), ("Either A or C could be right", ""),                              # ambiguous: no answer
    ("dog", "B"), ("It is a fish.", "D"), ("Fish", "D"),                               # rule 5: option text
    ("A dog runs", "B"),                     # "A" + lowercase word is the article, then option text "dog"
    ("cat and dog", ""),                     # two option texts: ambiguous
    ("", ""), ("I don't know", ""),          # nothing to extract
    ("E", ""), ("The answer is E", ""),      # E is not an option of this question
])
def test_extract_choice(text, expected):
    assert extract_choice(text, ABCD) == expected


def test_extract_letters_beyond_d_and_xtuner_failures():
    opts = {**ABCD, "E": "horse", "F": "cow"}
    assert extract_choice("F", opts) == "F"
    assert extract_choice("The answer is E.", opts) == "E"
    assert extract_choice("cow", opts) == "F"
    # XTuner's first-[A-D]+-run reads "Answer: B" as "A" (the A of "Answer"); we read B
    assert extract_choice("Answer: B", ABCD) == "B"
    # option text nested in another option's text: the longer one wins
    assert extract_choice("It is dark red", {"A": "red", "B": "dark red"}) == "B"
    # CJK option text, no letter
    assert extract_choice("图片里是苹果", {"A": "香蕉", "B": "苹果"}) == "B"
    # no options known (a bare predictions table): XTuner's A-D
    assert extract_choice("Answer: C", {c: "" for c in "ABCD"}) == "C"


# ---- the prompt ----------------------------------------------------------------------------------------------------


def test_prompt_with_hint_all_options():
    q = Question(index=1, question="What is shown?", hint="A photo.", options=dict(ABCD))
    assert build_prompt(q) == (
        "<image>\nA photo.\nWhat is shown?\nA. cat\nB. dog\nC. bird\nD. fish\n"
        "Answer with the option's letter from the given choices directly.")


def test_prompt_empty_hint_missing_options_and_chinese(dev_tsv):
    qs = {q.index: q for q in read_tsv(dev_tsv)}
    assert qs[2].hint == "A hint." and qs[1].hint == ""
    assert list(qs[2].options) == ["A", "B"]  # C and D are empty cells: not options
    assert build_prompt(qs[1]) == "<image>\nColour?\nA. red\nB. green\nC. blue\n" + EN
    assert build_prompt(qs[3]) == "<image>\n这是什么颜色？\nA. green\nB. red\n" + CN


def test_prompt_chinese_decided_on_whole_text():
    # XTuner looks for a CJK character anywhere in the text, options included
    q = Question(index=1, question="Which fruit?", options={"A": "苹果", "B": "banana"})
    assert build_prompt(q) == "<image>\nWhich fruit?\nA. 苹果\nB. banana\n" + CN


# ---- reading the TSV -----------------------------------------------------------------------------------------------


def test_read_tsv_references_nan_and_errors(dev_tsv, tmp_path):
    qs = {q.index: q for q in read_tsv(dev_tsv)}
    assert qs[1000001].image == qs[1].image and qs[3].image == qs[2].image   # index references followed
    assert colour_of(ev.decode_image(qs[3])) == "red"
    with pytest.raises(ValueError, match="not valid base64"):
        ev.decode_image(qs[4])
    qs[4].image = base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()  # valid base64, broken PNG
    with pytest.raises(ValueError, match="cannot decode"):
        ev.decode_image(qs[4])
    # "nan" is pandas' NaN (missing), a huge field is fine, a dangling reference is reported per row
    big = png_b64("green", size=(600, 600)) + " " * 200_000
    p = write_tsv(tmp_path / "x.tsv", ["index", "question", "hint", "A", "B", "category", "image"],
                  [[7, "Q?", "nan", "x", "nan", "c", big], [8, "Q?", "", "x", "y", "c", "99"]])
    q7, q8 = read_tsv(p)
    assert q7.hint == "" and q7.options == {"A": "x"} and colour_of(ev.decode_image(q7)) == "green"
    with pytest.raises(ValueError, match="index 99"):
        ev.decode_image(q8)
    dup = write_tsv(tmp_path / "dup.tsv", ["index", "question", "A", "category", "image"],
                    [[1, "Q", "x", "c", "1" * 20], [1, "Q", "x", "c", "1" * 20]])
    with pytest.raises(EvalError, match="index 1 appears on lines 2 and 3"):
        read_tsv(dup)


# ---- scoring -------------------------------------------------------------------------------------------------------


def rec(index, prediction, answer, l2, options=ABCD):
    return {"index": index, "prediction": prediction, "answer": answer, "category": "x", "l2-category": l2,
            "options": options}


def test_score_circular_and_categories_by_hand():
    records = [
        rec(10, "A", "A", "coarse_perception"), rec(1000010, "(B)", "B", "coarse_perception"),  # 10: all right
        rec(11, "C", "C", "coarse_perception"), rec(1000011, "The answer is A", "D", "coarse_perception"),  # wrong
        rec(12, "A or B", "A", "logic_reasoning"),          # ambiguous -> wrong
        rec(13, "fish", "D", "logic_reasoning"),            # option text -> right
        rec(14, "Answer: B", "B", "finegrained_perception (instance-level)"),  # right (XTuner would say "A")
    ]
    s = mm.score(records, by_l2=True)
    # mains 10 ✓, 11 ✗ (copy wrong), 12 ✗, 13 ✓, 14 ✓ -> 3/5; CP {10,11} 1/2; FP-S {14} 1/1; LR {12,13} 1/2
    assert s.metrics == {"Average": 3 / 5, "CP": 1 / 2, "FP-S": 1.0, "LR": 1 / 2}
    assert list(s.metrics) == ["Average", "CP", "FP-S", "LR"]  # sorted by raw name, then abbreviated
    assert (s.n_main, s.n_rows, s.n_unparsed) == (5, 7, 1)
    # grouped by category when the TSV has no l2-category (CCBench): abbreviations apply there too
    ccb = [rec(1, "A", "A", ""), rec(2, "B", "A", "")]
    ccb[0]["category"], ccb[1]["category"] = "food_clothes", "cultural_relic"
    assert mm.score(ccb, by_l2=False).metrics == {"Average": 0.5, "Cultural Relic": 0.0, "Food & Clothes": 1.0}


def test_format_table():
    text = mm.format_table({"Average": 0.6, "CP": 0.5, "LR": 2 / 3}, " MMBench (x.tsv) ")
    lines = text.splitlines()
    assert lines[0] == " MMBench (x.tsv) "
    assert [line.split()[-1] for line in lines if line.split()[0] in ("Average", "CP", "LR")] == \
        ["60.0", "50.0", "66.7"]


# ---- the whole run with a fake model -------------------------------------------------------------------------------


def test_run_dev_split(dev_tsv, tmp_path, capsys):
    calls = []
    out = tmp_path / "out"
    s = ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out)],
                load_fn=fake_loader(calls))
    assert s.metrics == pytest.approx(EXPECTED)
    assert json.loads((out / "mmbench_result.json").read_text()) == pytest.approx(EXPECTED)
    assert list(json.loads((out / "mmbench_result.json").read_text())) == ["Average", "CP", "LR"]
    text = capsys.readouterr().out
    assert "index 4: the image field is not valid base64" in text               # reported while running, and at the end
    assert "1 row(s) had no usable image" in text
    assert [line.split()[-1] for line in text.splitlines() if line[:3] in ("Ave", "CP ", "LR ")] == \
        ["60.0", "50.0", "66.7"]
    preds = {r["index"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    assert sorted(preds) == [1, 2, 3, 4, 5, 1000001, 1000002, 2000001]
    assert preds[4]["prediction"] == "" and preds[4]["hit"] is False and "base64" in preds[4]["error"]
    assert preds[3]["extracted"] == "B" and preds[1000002]["hit"] is False
    assert all(k in preds[1] for k in ("index", "prediction", "answer", "category", "l2-category"))
    # the prompts the model saw: Chinese instruction for row 3 only, the hint for rows 2 and 5
    assert sum(p.endswith(CN) for p in calls) == 1 and len(calls) == 7   # row 4 never reaches the model
    # the result table (xlsx when openpyxl is installed, else tsv with the same columns)
    table = out / "mmbench_result.xlsx"
    if not table.exists():
        with open(out / "mmbench_result.tsv", newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        # no row has a D option, so there is no D column (as in XTuner's DataFrame of the rows)
        assert list(rows[0]) == ["question", "A", "B", "C", "prediction", "category", "l2-category", "index",
                                 "split", "answer"]
        assert rows[2]["index"] == "3" and rows[2]["prediction"] == "The answer is B."


def test_test_split_writes_submission_only(tmp_path, capsys):
    header = [h for h in HEADER if h != "answer"]
    rows = [[r[i] for i, h in enumerate(HEADER) if h != "answer"] for r in dev_rows()]
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", header, rows)
    (tmp_path / "model").mkdir()
    assert ev.main(["--data", str(tsv), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")],
                   load_fn=fake_loader()) is None
    assert not (tmp_path / "o" / "mmbench_result.json").exists()
    assert any((tmp_path / "o" / f"mmbench_result.{e}").exists() for e in ("xlsx", "tsv"))
    assert "submit it to the MMBench evaluation server" in capsys.readouterr().out


def test_missing_column_fails_before_model_load(tmp_path):
    rows = [[r[0], r[1], *r[3:]] for r in dev_rows()]
    tsv = write_tsv(tmp_path / "bad.tsv", [h for h in HEADER if h != "hint"], rows)
    read_tsv(tsv)  # hint is optional
    tsv = write_tsv(tmp_path / "bad.tsv", [h for h in HEADER if h != "question"], [r[:1] + r[2:] for r in dev_rows()])
    with pytest.raises(EvalError, match="missing column.*question"):
        ev.main(["--data", str(tsv), "--model", str(tmp_path), "--out", str(tmp_path / "o")], load_fn=failing_loader)


def test_missing_model_says_what_to_do(dev_tsv, tmp_path):
    with pytest.raises(EvalError, match="train one first.*--model"):
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "nope")], load_fn=failing_loader)


def test_loader_errors_are_one_line_eval_errors(dev_tsv, tmp_path, monkeypatch):
    # no --model and no runs/latest: the loader's default says what to do
    monkeypatch.chdir(tmp_path)
    with pytest.raises(EvalError, match="(?i)train one first.*--model"):
        ev.main(["--data", str(dev_tsv)], load_fn=failing_loader)
    # a folder that holds no model: the real loader's LoadError, as an EvalError naming the folder
    with pytest.raises(EvalError, match=re.escape(str(tmp_path / "model"))):
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag, value", [("--batch-size", "0"), ("--max-new-tokens", "-3"), ("--batch-size", "x"),
                                         ("--limit", "0")])
def test_a_count_below_one_is_a_usage_error(dev_tsv, tmp_path, capsys, flag, value):
    """A batch of 0 questions, no new tokens or a limit of 0 rows cannot answer anything (--limit 0 was scored as
    0.0 of 0 questions): argparse's usage error names the flag, before any model is loaded."""
    with pytest.raises(SystemExit) as e:
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), flag, value], load_fn=failing_loader)
    assert e.value.code == 2
    assert f"argument {flag}: '{value}' is not a whole number of at least 1" in capsys.readouterr().err


def test_work_dir_of_another_model_is_refused(dev_tsv, tmp_path):
    out = tmp_path / "out"
    ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out), "--limit", "1"],
            load_fn=fake_loader())
    (tmp_path / "other").mkdir()
    with pytest.raises(EvalError, match="another evaluation.*model"):
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "other"), "--out", str(out)], load_fn=fake_loader())
    # the loader's flags name other weights or another template: also another evaluation
    with pytest.raises(EvalError, match="another evaluation.*template"):
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out), "--template",
                 "vicuna"], load_fn=fake_loader())


def test_resume_skips_answered_questions(dev_tsv, tmp_path):
    out = tmp_path / "out"
    args = ["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out)]
    first = []
    ev.main(args + ["--limit", "3"], load_fn=fake_loader(first))
    assert len(first) == 3
    # a kill while writing leaves a line without its newline: it is dropped and its question asked again
    part = out / "partial-rank0.jsonl"
    part.write_text(part.read_text() + '{"index": 2, "predic')
    second = []
    s = ev.main(args, load_fn=fake_loader(second))
    assert len(second) == 4   # 8 rows - 3 answered - 1 bad image (never sent to the model)
    assert s.metrics == pytest.approx(EXPECTED)
    assert s.n_rows == 8


def test_batches_and_limit(dev_tsv, tmp_path):
    batches = []
    s = ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o"),
                 "--batch-size", "3"], load_fn=fake_loader(batches=batches))
    # batches of 3 rows: [1, 1000001, 2000001] [2, 1000002, 3] [4 (bad), 5]
    assert batches == [3, 3, 1] and s.metrics == pytest.approx(EXPECTED)


# ---- --score -------------------------------------------------------------------------------------------------------


def test_score_predictions_file_with_tsv(dev_tsv, tmp_path):
    preds = tmp_path / "preds.tsv"
    # mains: 1 ✓ (copies ✓), 2 ✓ but copy ✗, 3 ✗, 4 ✓, 5 "B or C" ambiguous ✗ -> Average 2/5
    write_tsv(preds, ["index", "prediction"], [
        [1, "A"], [1000001, "The answer is C"], [2000001, "(B)"], [2, "B"], [1000002, "B"], [3, "A"], [4, "green"],
        [5, "B or C"]])
    s = ev.main(["--score", str(preds), "--data", str(dev_tsv)], load_fn=failing_loader)
    assert s.metrics["Average"] == pytest.approx(2 / 5)
    assert s.metrics == pytest.approx({"Average": 2 / 5, "CP": 1 / 2, "LR": 1 / 3})
    assert not (tmp_path / "predictions.jsonl").exists()  # files only with --out


def test_xlsx_table_round_trip(dev_tsv, tmp_path):
    pytest.importorskip("openpyxl")  # optional: without it the table is a .tsv (tested in test_run_dev_split)
    out = tmp_path / "out"
    ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out)], load_fn=fake_loader())
    s = ev.main(["--score", str(out / "mmbench_result.xlsx")], load_fn=failing_loader)  # answers from the table
    assert s.metrics == pytest.approx(EXPECTED)


def test_score_our_predictions_without_tsv(dev_tsv, tmp_path):
    out = tmp_path / "out"
    ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out)], load_fn=fake_loader())
    s = ev.main(["--score", str(out / "predictions.jsonl"), "--out", str(tmp_path / "re")], load_fn=failing_loader)
    assert s.metrics == pytest.approx(EXPECTED)
    assert json.loads((tmp_path / "re" / "mmbench_result.json").read_text()) == pytest.approx(EXPECTED)
    bare = write_tsv(tmp_path / "bare.tsv", ["index", "prediction"], [[1, "A"]])
    with pytest.raises(EvalError, match="no answer; pass --data"):
        ev.main(["--score", str(bare)])


# ---- data parallel: 2 gloo ranks -----------------------------------------------------------------------------------


def _rank_main(rank, world, port, argv, result_file):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
    s = ev.main(argv, load_fn=fake_loader())
    if rank == 0:
        with open(result_file, "w") as f:
            json.dump(s.metrics, f)


def test_two_ranks_shard_and_merge(dev_tsv, tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "out"
    argv = ["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out), "--batch-size", "2"]
    # spawn, not fork: a fork would inherit the process group an in-process training test may have left here
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, argv, str(tmp_path / "r.json"))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert json.loads((tmp_path / "r.json").read_text()) == pytest.approx(EXPECTED)
    per_rank = [[json.loads(x)["index"] for x in (out / f"partial-rank{r}.jsonl").read_text().splitlines()]
                for r in (0, 1)]
    assert per_rank == [[1, 2000001, 1000002, 4], [1000001, 2, 3, 5]]  # strided shards of the TSV order


# ---- the real model: batched answers equal one-at-a-time answers ---------------------------------------------------


def tiny_llava_loader():
    """A random tiny LLaVA (tiny CLIP + tiny Llama with the real Llama-3 vocabulary) and the real Llama-3 tokenizer,
    behind eval_mmbench.make_generator: the same code path as a trained model, minus reading it from disk."""
    import torch
    import clip
    import demo
    import llama
    import model as llava
    from tokenizer import TiktokenTokenizer
    tok = TiktokenTokenizer.from_model_file(demo.llama3_tokenizer_file())
    torch.manual_seed(0)
    vcfg, lcfg = clip.CLIPConfig.from_name("tiny"), llama.LlamaConfig.from_name("tiny")
    net = llava.LLaVA(clip.CLIPVisionTower(vcfg), llava.Projector(vcfg.hidden_size, lcfg.hidden_size),
                      llama.Llama(lcfg))
    cfg = {"template": "llama3_chat", "image_mode": "pad", "image_size": vcfg.image_size,
           "image_tokens": vcfg.num_patches}

    def load(args, device, dtype):
        return ev.make_generator(net, tok, cfg, device, dtype, args.max_new_tokens), cfg
    return load


def test_batched_answers_equal_unbatched_real_model(dev_tsv, tmp_path):
    load = tiny_llava_loader()
    answers = []
    for bs in (1, 4):
        out = tmp_path / f"bs{bs}"
        ev.main(["--data", str(dev_tsv), "--model", str(tmp_path / "model"), "--out", str(out),
                 "--batch-size", str(bs), "--max-new-tokens", "6", "--dtype", "fp32"], load_fn=load)
        answers.append({r["index"]: r["prediction"]
                        for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())})
    assert answers[0] == answers[1]
    # prompts of different lengths (hint, Chinese) were left-padded together, and the random model does not
    # give every row the same answer, so the comparison can fail
    assert len(set(answers[0].values())) > 2


def test_model_inputs_equal_xtuner_construction(dev_tsv, monkeypatch):
    """What make_generator feeds model.generate, against XTuner's mmbench.py way of building it: the llama3_chat
    INSTRUCTION string (typed here) around the prompt, split at "<image>", each piece encoded by transformers' fast
    tokenizer (converted offline from the same tokenizer.model), BOS first (the Llama-3 tokenizer's post-processor
    adds it to the first piece), 576 x -200 between the pieces."""
    import torch
    import demo
    import model as llava
    from tokenizer import TiktokenTokenizer
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = demo.llama3_tokenizer_file()
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
             "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>",
             "<|eot_id|>", "<|python_tag|>", "<|image|>"]
    names += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(names))]
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    hf = PreTrainedTokenizerFast(tokenizer_object=TikTokenConverter(
        vocab_file=str(path), pattern=pattern, extra_special_tokens=names).converted())
    instruction = ("<|start_header_id|>user<|end_header_id|>\n\n{input}<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")

    def xtuner_ids(text):
        first, rest = instruction.format(input=text).split("<image>")
        return [128000] + hf.encode(first, add_special_tokens=False) + [-200] * 576 + \
            hf.encode(rest, add_special_tokens=False)

    seen = {}

    def fake_generate(net, ids, pixels, max_new_tokens, temperature, stop_ids):
        seen.update(ids=ids, pixels=pixels, stop_ids=stop_ids, temperature=temperature, max_new=max_new_tokens)
        return [[128009] for _ in ids]

    monkeypatch.setattr(llava, "generate", fake_generate)
    tok = TiktokenTokenizer.from_model_file(path)
    cfg = {"template": "llama3_chat", "image_size": 336, "image_tokens": 576}
    gen = ev.make_generator(torch.nn.Identity(), tok, cfg, "cpu", torch.float32, max_new_tokens=100)
    qs = [q for q in read_tsv(dev_tsv) if q.index in (2, 3, 5)]  # hint, Chinese, 3 options
    assert gen([build_prompt(q) for q in qs], [ev.decode_image(q) for q in qs]) == ["", "", ""]
    assert seen["ids"] == [xtuner_ids(build_prompt(q)) for q in qs]
    assert seen["pixels"].shape == (3, 3, 336, 336) and seen["pixels"].dtype == torch.float32
    assert sorted(seen["stop_ids"]) == [128001, 128009]  # <|end_of_text|>, <|eot_id|>
    assert (seen["temperature"], seen["max_new"]) == (0.0, 100)
