"""The three benchmark kinds of eval_mmbench.py (extras/benchmarks.py, extras/scoring.py): reading VLMEvalKit-format
TSVs, telling their kind, the prompts, and each benchmark's metric.

Every expected score is worked out by hand in the test from the benchmark's definition (VLMEvalKit's exact-matching
rules for reading an answer), with the arithmetic in a comment; the predictions mix short and verbose answers. No
model: predictions files go through `--score`, and a fake generator answers from the prompt and the picture.
"""

import base64
import io
import json

import openpyxl
import pytest
from PIL import Image

import eval_mmbench as ev
from extras import scoring
from extras.benchmarks import Question, read_benchmark
from extras.mmbench import EvalError
from test_eval import colour_of, png_b64, write_tsv

RED, GREEN = png_b64("red"), png_b64("green")
ABCD = {"A": "cat", "B": "dog", "C": "bird", "D": "fish"}


def score_file(tmp_path, tsv, predictions, *extra):
    """--score a {index: prediction} set against a TSV; returns (Scores, the <name>_result.json)."""
    preds = tmp_path / "preds.jsonl"
    preds.write_text("".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in predictions.items()))
    out = tmp_path / "out"
    s = ev.main(["--score", str(preds), "--data", str(tsv), "--out", str(out), *extra])
    return s, json.loads((out / f"{tsv.stem}_result.json").read_text())


# ---- reading answers: the three readings, on verbose answers ---------------------------------------------------


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("The answer is D.", "D"),        # a letter among the last four words
    ("The answer is (B) because the dog barks.", ""),  # B is the 4th of 8 words, and "(B" is not "answer is B";
    # then the text rule: 40 characters > 2 x (3 + 3 + 4 + 4) = 28, too long to look for option texts
    ("bird", "C"),                                # no letter: the only option text inside the answer
    ("Answer: A", "A"),                           # ":" splits the words
    ("the correct answer is **c**", "C"),         # "answer is" and a letter in any case
    ("Cannot determine the answer", "Z"),         # a refusal: never right
    ("A or B", ""),                               # two letters, and no "answer is"
])
def test_vlmevalkit_letter_reading(text, letter):
    assert scoring.vlmevalkit_choice(text, ABCD) == letter


@pytest.mark.parametrize("text, answer", [
    ("Yes", "Yes"), ("Yes, there is a dog.", "Yes"), ("no.", "No"), ("No, there is no cat.", "No"),
    ("There is no dog in the image.", "No"), ("I am not sure.", "Unknown"), ("Yes and no", "Unknown"),
    ("**Yes**", "Unknown"),                       # "*" is not among the marks VLMEvalKit strips: the word is **yes**
])
def test_yes_no_reading(text, answer):
    assert scoring.yes_no(text) == answer


@pytest.mark.parametrize("text, normal", [
    ("Seven.", "7"), ("The Coca-Cola", "coca cola"), ("dont", "don't"), ("couldnt've", "couldn't've"),
    ("an apple, a pear", "apple pear"), ("1,000", "1000"), ("3.5", "3.5"), ("Ten dogs!", "10 dogs"),
])
def test_vqa_normalisation(text, normal):
    assert scoring.normalize_answer(text) == normal


# ---- telling the kind ----------------------------------------------------------------------------------------------


def test_kind_from_name_columns_and_flag(tmp_path):
    mc = [[1, "Q?", "x", "y", "A", "c", RED]]
    yn = [[1, "Q?", "Yes", "c", RED], [2, "Q?", "No", "c", RED]]
    open_ = [[1, "Q?", "seven", "c", RED]]
    cases = {  # file name, header, rows -> (kind, rules)
        ("MMBench_DEV_CN_V11", "mc"): ("mcq", "mmbench"), ("CCBench", "mc"): ("mcq", "mmbench"),
        ("SEEDBench_IMG", "mc"): ("mcq", "plain"), ("MMMU_DEV_VAL", "mc"): ("mcq", "mmmu"),
        ("my_quiz", "mc"): ("mcq", "mmbench"),        # any other multiple-choice TSV: MMBench's rules
        ("POPE", "yn"): ("yorn", "pope"), ("MME", "yn"): ("yorn", "mme"),
        ("HallusionBench", "yn"): ("yorn", "hallusion"), ("shapes", "yn"): ("yorn", "yorn"),
        ("TextVQA_VAL", "open"): ("vqa", "textvqa"), ("GQA_TestDev_Balanced", "open"): ("vqa", "gqa"),
        ("questions", "open"): ("vqa", "vqa"),
    }
    layouts = {"mc": (["index", "question", "A", "B", "answer", "category", "image"], mc),
               "yn": (["index", "question", "answer", "category", "image"], yn),
               "open": (["index", "question", "answer", "category", "image"], open_)}
    for (name, layout), expected in cases.items():
        b = read_benchmark(write_tsv(tmp_path / f"{name}.tsv", *layouts[layout]))
        assert (b.kind, b.rules) == expected, name
    # --kind overrides: an unnamed yes/no file read as open VQA; a named one keeps its rules only for its own kind
    assert read_benchmark(tmp_path / "shapes.tsv", "vqa").rules == "vqa"
    assert read_benchmark(tmp_path / "POPE.tsv", "vqa").rules == "vqa"
    with pytest.raises(EvalError, match="missing column.*A"):  # multiple choice needs option columns
        read_benchmark(tmp_path / "POPE.tsv", "mcq")
    # a header and no rows: refused before a model loads (it used to be scored as 0.0 of 0 questions)
    with pytest.raises(EvalError, match=r"empty.tsv: no questions, only a header line"):
        read_benchmark(write_tsv(tmp_path / "empty.tsv", layouts["mc"][0], []))


def test_prompts_of_each_kind(tmp_path):
    q = Question(index=1, question="Is there a dog in the image?", options={}, hint="unused")
    assert ev.build_prompt(q, "yorn") == "<image>\nIs there a dog in the image?"
    q = Question(index=1, question="What is written on the sign?")
    assert ev.build_prompt(q, "vqa") == \
        "<image>\nWhat is written on the sign?\nAnswer the question using a single word or phrase."


# ---- reading the TSV: pictures as lists, files, names as indices -------------------------------------------------


def test_pictures_lists_files_and_named_indices(tmp_path):
    # MMMU: a list of pictures, the first is used; a row with an empty image cell is left out
    tsv = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", ["index", "question", "A", "B", "answer", "image"],
                    [[1, "<image 1> <image 2> Which?", "x", "y", "A", str([RED, GREEN])], [2, "Q", "x", "y", "A", ""]])
    b = read_benchmark(tsv)
    assert [q.index for q in b.questions] == [1] and b.no_image == [2]
    assert colour_of(ev.decode_image(b.questions[0])) == "red"
    assert ev.build_prompt(b.questions[0]).startswith("<image>\n<image 1> <image 2> Which?\n")  # marks stay text
    # pictures as files (image_path, relative to the TSV's folder), no image column
    (tmp_path / "pics").mkdir()
    Image.open(io.BytesIO(base64.b64decode(GREEN))).save(tmp_path / "pics" / "g.png")
    tsv = write_tsv(tmp_path / "files.tsv", ["index", "question", "answer", "image_path"],
                    [[1, "Q?", "Yes", "pics/g.png"], [2, "Q?", "No", ""]])
    b = read_benchmark(tsv)
    assert colour_of(ev.decode_image(b.questions[0])) == "green" and b.no_image == [2]
    # names as indices (HallusionBench), a picture shared by naming the row that holds it
    tsv = write_tsv(tmp_path / "HallusionBench.tsv", ["index", "question", "answer", "image"],
                    [["VD_map_0_1_0_0", "Q?", "Yes", RED], ["VD_map_0_1_0_1", "Q?", "No", "VD_map_0_1_0_0"]])
    qs = read_benchmark(tsv).questions
    assert [q.index for q in qs] == ["VD_map_0_1_0_0", "VD_map_0_1_0_1"] and qs[1].image == RED


# ---- multiple choice -----------------------------------------------------------------------------------------------


def test_plain_accuracy_both_readings(tmp_path):
    header = ["index", "question", "A", "B", "C", "D", "answer", "category", "image"]
    tsv = write_tsv(tmp_path / "SEEDBench_IMG.tsv", header, [
        [1, "Q", *ABCD.values(), "B", "animals", RED], [2, "Q", *ABCD.values(), "B", "animals", RED],
        [3, "Q", *ABCD.values(), "C", "nature", RED], [4, "Q", *ABCD.values(), "D", "nature", RED],
        [5, "Q", *ABCD.values(), "D", "nature", RED]])
    s, result = score_file(tmp_path, tsv, {
        1: "B",                                           # ours B, VLMEvalKit B: right
        2: "The answer is (B) because the dog barks.",    # ours B; VLMEvalKit none (test above): wrong there
        3: "bird",                                        # option text: C for both
        4: "Answer: A",                                   # A for both: wrong
        5: "The answer is D."})                           # D for both
    # ours: 1, 2, 3, 5 right -> 4/5; animals {1, 2} 2/2; nature {3, 4, 5} 2/3
    assert result["metrics"] == pytest.approx({"Overall": 4 / 5, "animals": 1.0, "nature": 2 / 3})
    # VLMEvalKit's reading: 1, 3, 5 right -> 3/5; animals 1/2; nature 2/3
    assert result["vlmevalkit"] == pytest.approx({"Overall": 3 / 5, "animals": 1 / 2, "nature": 2 / 3})
    assert (result["kind"], result["rules"], result["headline"]) == ("mcq", "plain", "Overall")
    assert s.headline == "80.0"


def test_mmbench_circular_both_readings_and_xtuner_keys(tmp_path):
    header = ["index", "question", "A", "B", "C", "answer", "category", "l2-category", "split", "image"]
    tsv = write_tsv(tmp_path / "MMBench_DEV_EN.tsv", header, [
        [1, "Colour?", "red", "green", "blue", "A", "colour", "coarse_perception", "dev", RED],
        [1000001, "Colour?", "green", "blue", "red", "C", "colour", "coarse_perception", "dev", "1"],
        [2, "Colour?", "green", "red", "blue", "B", "colour", "logic_reasoning", "dev", RED]])
    s, result = score_file(tmp_path, tsv, {
        1: "The answer is (A) because it is red.",  # ours A; VLMEvalKit: A is the 4th of 8 words, no "answer is A",
        1000001: "C",                               # and 36 characters > 2 x (3 + 5 + 4): nothing
        2: "B"})
    # ours: question 1 (both rows right) and 2 right -> 2/2; VLMEvalKit: question 1 wrong -> 1/2
    assert result["metrics"] == pytest.approx({"Overall": 1.0, "CP": 1.0, "LR": 1.0, "colour": 1.0})
    assert result["vlmevalkit"] == pytest.approx({"Overall": 0.5, "CP": 0.0, "LR": 1.0, "colour": 0.5})
    # mmbench_result.json keeps XTuner's keys: Average, then the l2-categories
    assert json.loads((tmp_path / "out" / "mmbench_result.json").read_text()) == {"Average": 1.0, "CP": 1.0, "LR": 1.0}
    assert s.metrics == {"Average": 1.0, "CP": 1.0, "LR": 1.0} and result["counts"]["rows"] == 3


def test_mmmu_open_questions_and_splits(tmp_path):
    header = ["index", "question", "A", "B", "answer", "category", "split", "image"]
    tsv = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", header, [
        [1, "How many?", "3", "4", "B", "Math", "validation", str([RED, GREEN])],
        [2, "How long is it?", "", "", "12.5", "Math", "validation", RED],  # open: A "12.5", B "Other Answers"
        [3, "Colour?", "red", "blue", "A", "Art", "dev", RED]])
    s, result = score_file(tmp_path, tsv, {1: "B", 2: "The length is 12.5 cm.", 3: "blue"})
    # validation: 1 right (B), 2 right (the reference text "12.5" is in the answer: A) -> 2/2; dev: 3 reads B -> 0/1
    assert result["metrics"] == {"dev": {"Overall": 0.0, "Art": 0.0}, "validation": {"Overall": 1.0, "Math": 1.0}}
    assert result["vlmevalkit"] == result["metrics"]
    assert result["headline"] == "validation Overall" and s.headline == "100.0"


# ---- yes / no ------------------------------------------------------------------------------------------------------


def test_pope_accuracy_precision_recall_f1(tmp_path):
    tsv = write_tsv(tmp_path / "POPE.tsv", ["index", "question", "answer", "category", "image"], [
        [1, "Is there a dog in the image?", "Yes", "adversarial", RED],
        [2, "Is there a cat in the image?", "No", "adversarial", RED],
        [3, "Is there a car in the image?", "Yes", "popular", RED],
        [4, "Is there a bus in the image?", "No", "popular", RED],
        [5, "Is there a cup in the image?", "Yes", "random", RED],
        [6, "Is there a hat in the image?", "No", "adversarial,random", RED]])  # in two splits: counted in each
    s, result = score_file(tmp_path, tsv, {
        1: "Yes, there is a dog.",   # Yes: right (true positive)
        2: "No.",                    # No: right
        3: "There is no car.",       # No: wrong (a missed yes)
        4: "yes",                    # Yes: wrong (a false yes)
        5: "I am not sure.",         # Unknown: wrong, and not a yes
        6: "No, there is not."})     # No: right, in adversarial and random
    m = result["metrics"]
    # overall over the 7 (row, split) pairs: answers yes {1, 3, 5}, said yes {1, 4}, true positive {1}:
    # precision 1/2, recall 1/3, F1 = 2 * 1/2 * 1/3 / (1/2 + 1/3) = 0.4; right {1, 2, 6, 6} -> 4/7
    assert m["Overall"] == pytest.approx({"F1": 40.0, "acc": 400 / 7, "precision": 50.0, "recall": 100 / 3})
    # adversarial {1, 2, 6}: all right, the one yes found -> 100 everywhere
    assert m["adversarial"] == pytest.approx({"F1": 100.0, "acc": 100.0, "precision": 100.0, "recall": 100.0})
    # popular {3, 4}: both wrong; said yes once (4, no), missed 3 -> precision 0, recall 0, F1 0
    assert m["popular"] == pytest.approx({"F1": 0.0, "acc": 0.0, "precision": 0.0, "recall": 0.0})
    # random {5, 6}: 6 right -> 1/2; no yes said, 5 missed -> 0, 0, 0
    assert m["random"] == pytest.approx({"F1": 0.0, "acc": 50.0, "precision": 0.0, "recall": 0.0})
    assert s.headline == "40.0" and result["counts"]["unparsed"] == 1


@pytest.mark.parametrize("with_paths", [True, False])
def test_mme_scores_pair_the_questions_of_a_picture(tmp_path, with_paths):
    header = ["index", "question", "answer", "category", "image"] + (["image_path"] if with_paths else [])
    rows = [[1, "Is it red? Please answer yes or no.", "Yes", "color", RED, "color/1.png"],
            [2, "Is it green? Please answer yes or no.", "No", "color", "1", "color/1.png"],
            [3, "Is it green? Please answer yes or no.", "Yes", "color", GREEN, "color/2.png"],
            [4, "Is it red? Please answer yes or no.", "No", "color", "3", "color/2.png"],
            [5, "Does the code print 3? Please answer yes or no.", "Yes", "code_reasoning", RED, "code/1.png"],
            [6, "Does the code print 4? Please answer yes or no.", "No", "code_reasoning", "5", "code/1.png"]]
    tsv = write_tsv(tmp_path / "MME.tsv", header, [r if with_paths else r[:-1] for r in rows])
    s, result = score_file(tmp_path, tsv, {1: "Yes", 2: "No", 3: "Yes.", 4: "Yes", 5: "No", 6: "No, it is not."})
    # color: right 1, 2, 3 -> accuracy 3/4 = 75; pictures 1 {1, 2} both right, 2 {3, 4} not -> accuracy+ 1/2 = 50
    # code_reasoning: right 6 -> 1/2 = 50; its one picture not both right -> 0
    m = result["metrics"]
    assert m == pytest.approx({"perception": 125.0, "cognition": 50.0, "color": 125.0, "code_reasoning": 50.0})
    assert s.headline == "125.0/50.0" and "OCR" in result["missing_subtasks"]


def test_hallusionbench_question_and_figure_accuracy(tmp_path):
    # index: <category>_<subcategory>_<n>_<set>_<figure>_<question>
    tsv = write_tsv(tmp_path / "HallusionBench.tsv", ["index", "question", "answer", "category", "l2-category",
                                                      "image"], [
        ["VD_chart_0_1_0_0", "Q", "Yes", "VD", "chart", RED],
        ["VD_chart_0_1_0_1", "Q", "No", "VD", "chart", RED],
        ["VD_chart_0_1_1_0", "Q", "No", "VD", "chart", RED],
        ["VD_chart_0_1_1_1", "Q", "Yes", "VD", "chart", RED],
        ["VS_map_0_2_0_0", "Q", "Yes", "VS", "map", RED],
        ["VS_map_0_2_0_1", "Q", "No", "VS", "map", RED]])
    s, result = score_file(tmp_path, tsv, {
        "VD_chart_0_1_0_0": "Yes", "VD_chart_0_1_0_1": "No", "VD_chart_0_1_1_0": "Yes, it does.",
        "VD_chart_0_1_1_1": "Yes", "VS_map_0_2_0_0": "No", "VS_map_0_2_0_1": "no."})
    m = result["metrics"]
    # right: the 1st, 2nd, 4th, 6th -> aAcc 4/6
    # figures (l2, set, figure): chart-1-0 {1st, 2nd} all right; chart-1-1 {3rd, 4th} no; map-2-0 {5th, 6th} no -> 1/3
    # questions (l2, set, question): chart-1-0 {1st, 3rd} no; chart-1-1 {2nd, 4th} yes; map-2-0 {5th} no;
    # map-2-1 {6th} yes -> 2/4
    assert m["Overall"] == pytest.approx({"aAcc": 400 / 6, "fAcc": 100 / 3, "qAcc": 50.0})
    # VD = chart: 3/4; figures 1 of 2; questions 1 of 2.  VS = map: 1/2; figures 0 of 1; questions 1 of 2
    assert m["VD"] == m["chart"] == pytest.approx({"aAcc": 75.0, "fAcc": 50.0, "qAcc": 50.0})
    assert m["VS"] == m["map"] == pytest.approx({"aAcc": 50.0, "fAcc": 0.0, "qAcc": 50.0})
    assert s.headline == "66.7"


def test_other_yes_no_set_accuracy_per_category(tmp_path):
    tsv = write_tsv(tmp_path / "shapes.tsv", ["index", "question", "answer", "category", "image"], [
        [1, "Q", "Yes", "colour", RED], [2, "Q", "No", "colour", RED], [3, "Q", "Yes", "count", RED]])
    _, result = score_file(tmp_path, tsv, {1: "Yes, it is.", 2: "Yes", 3: "Yes."})
    # right 1 and 3 -> 2/3; colour 1/2; count 1/1
    assert result["metrics"] == pytest.approx({"Overall": 200 / 3, "colour": 50.0, "count": 100.0})


def test_a_bad_prediction_row_is_reported_and_the_others_scored(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "shapes.tsv", ["index", "question", "answer", "category", "image"], [
        [1, "Q", "Yes", "c", RED], [2, "Q", "No", "c", RED]])
    _, result = score_file(tmp_path, tsv, {1: "Yes", 99: "No", 2: "Yes"})
    assert "row 3: index 99 is not in the TSV" in capsys.readouterr().out
    assert result["metrics"] == pytest.approx({"Overall": 50.0, "c": 50.0})  # 1 right, 2 wrong
    with pytest.raises(EvalError, match="index 99 is not in the TSV"):  # nothing left to score: an error
        score_file(tmp_path, tsv, {99: "No"})


# ---- open VQA ------------------------------------------------------------------------------------------------------


def test_textvqa_accuracy_over_ten_references(tmp_path):
    refs = {1: ["7", "7"] + ["8"] * 8, 2: ["the coca cola", "coca cola", "coca cola"] + ["coke"] * 7,
            3: ["yes"] * 10, 4: ["dont"] * 4 + ["stop"] * 6}
    tsv = write_tsv(tmp_path / "TextVQA_VAL.tsv", ["index", "question", "answer", "image"],
                    [[i, "Q", str(r), RED] for i, r in refs.items()])
    s, result = score_file(tmp_path, tsv, {1: "Seven.", 2: "Coca Cola", 3: "The answer is yes", 4: "don't"})
    # an answer equal to m of the ten references scores, averaged over the ten sets of nine,
    # (m * min(1, (m - 1) / 3) + (10 - m) * min(1, m / 3)) / 10:
    # 1: "seven" -> "7", m = 2: (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    # 2: "coca cola", and "the coca cola" loses its article, m = 3: (3 * 2/3 + 7 * 1) / 10 = 0.9
    # 3: "answer is yes" equals none: 0
    # 4: "dont" becomes "don't", m = 4: 1
    assert result["metrics"] == pytest.approx({"Overall": (0.6 + 0.9 + 0 + 1) / 4 * 100})
    assert s.headline == "62.5"


def test_gqa_exact_match_after_normalisation_and_vlmevalkits(tmp_path):
    tsv = write_tsv(tmp_path / "GQA_TestDev_Balanced.tsv", ["index", "question", "answer", "image"], [
        [1, "Q", "yes", RED], [2, "Q", "cat", RED], [3, "Q", "left", RED], [4, "Q", "2", RED], [5, "Q", "red", RED]])
    _, result = score_file(tmp_path, tsv, {1: "Yes.", 2: "The cat", 3: "Left", 4: "two", 5: "blue"})
    # normalised: yes, cat, left, 2 match -> 4/5; VLMEvalKit lowercases and trims only: "left" alone -> 1/5
    assert result["metrics"] == pytest.approx({"Overall": 80.0})
    assert result["vlmevalkit"] == pytest.approx({"Overall": 20.0})


# ---- several benchmarks in one run, with a fake model ------------------------------------------------------------


def fake_loader(prompts):
    def generate(batch, images):
        out = []
        for p, img in zip(batch, images):
            prompts.append(p)
            colour = colour_of(img)
            if p.endswith("directly."):  # multiple choice: the option naming the colour
                out.append(next(f"The answer is {line[0]}." for line in p.split("\n") if line[3:] == colour))
            else:                        # yes / no: "Is the picture <colour>?"
                asked = p.split()[-1].rstrip("?")
                out.append("Yes, it is." if asked == colour else "No, it is not.")
        return out

    return lambda args, device, dtype: (generate, {"template": "llama3_chat", "image_size": 336, "image_tokens": 576})


def test_several_benchmarks_one_summary_table(tmp_path, capsys):
    quiz = write_tsv(tmp_path / "quiz.tsv", ["index", "question", "A", "B", "answer", "category", "image"], [
        [1, "Colour?", "red", "green", "A", "c", RED], [2, "Colour?", "red", "green", "B", "c", GREEN]])
    yesno = write_tsv(tmp_path / "yesno.tsv", ["index", "question", "answer", "category", "image"], [
        [1, "Is the picture red?", "Yes", "c", RED], [2, "Is the picture green?", "No", "c", "1"],
        [3, "Is the picture green?", "Yes", "c", GREEN], [4, "Is the picture red?", "Yes", "c", "3"]])
    (tmp_path / "model").mkdir()
    prompts, out = [], tmp_path / "out"
    results = ev.main(["--data", str(quiz), "--data", str(yesno), "--model", str(tmp_path / "model"), "--out",
                       str(out)], load_fn=fake_loader(prompts))
    # quiz: both right -> 100; yes/no: 1, 2, 3 right, 4 (red asked of the green picture, answer "Yes") wrong -> 75
    assert [r.headline for r in results] == ["100.0", "75.0"]
    assert "<image>\nIs the picture green?" in prompts  # the yes/no prompt is the question alone
    lines = capsys.readouterr().out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| model"))
    assert [c.strip() for c in lines[head].strip("|").split("|")] == ["model", "quiz (Overall)", "yesno (Overall)"]
    assert [c.strip() for c in lines[head + 2].strip("|").split("|")][1:] == ["100.0", "75.0"]
    assert json.loads((out / "quiz_result.json").read_text())["metrics"]["Overall"] == 1.0
    assert json.loads((out / "yesno_result.json").read_text())["metrics"] == {"Overall": 75.0, "c": 75.0}
    # each benchmark's work folder: out/<name>; the MMBench-rules one keeps XTuner's files
    assert (out / "quiz" / "mmbench_result.json").exists() and (out / "quiz" / "mmbench_result.xlsx").exists()
    assert {p.name for p in (out / "yesno").iterdir()} == {"run.json", "partial-rank0.jsonl", "predictions.jsonl"}


def test_test_split_submission_is_xlsx(tmp_path):
    tsv = write_tsv(tmp_path / "MMBench_TEST_EN.tsv", ["index", "question", "hint", "A", "B", "category",
                                                       "l2-category", "image"],
                    [[1, "Colour?", "Look.", "red", "green", "c", "coarse_perception", RED]])
    (tmp_path / "model").mkdir()
    assert ev.main(["--data", str(tsv), "--model", str(tmp_path / "model"), "--out", str(tmp_path / "o")],
                   load_fn=fake_loader([])) is None
    rows = list(openpyxl.load_workbook(tmp_path / "o" / "mmbench_result.xlsx").active.iter_rows(values_only=True))
    assert rows[0] == ("question", "A", "B", "prediction", "category", "l2-category", "index", "split", "answer")
    assert rows[1][:4] == ("Colour?", "red", "green", "The answer is A.") and rows[1][6] == 1
