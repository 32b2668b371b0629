r"""MMBench / CCBench evaluation: the prompt, greedy answers, answer-letter extraction, CircularEval scoring.

    python eval_mmbench.py --data MMBench_DEV_EN.tsv                    # the newest trained model (runs/latest)
    python eval_mmbench.py --data MMBench_DEV_EN.tsv --model DIR --limit 50 --batch-size 16
    torchrun --nproc_per_node 8 eval_mmbench.py --data MMBench_DEV_EN.tsv   # data parallel, one shard per rank
    python eval_mmbench.py --score OUT/predictions.jsonl [--data TSV]   # re-score a predictions file, no model

It does what XTuner's `xtuner mmbench` does (xtuner/tools/mmbench.py, v0.2.0; shared/reference §7):

1. Read the TSV: `index, question, hint, A, B, ... (any single-capital-letter column), answer (dev split only),
   category, l2-category, image` (base64; a value shorter than 16 characters is the `index` of another row whose
   image it shares, as in the circular TSVs).
2. Prompt (`build_prompt`): "<image>\n" [hint "\n"] question "\n" "A. ...\n" ... then "Answer with the option's letter
   from the given choices directly." or, when the text holds a CJK character [\u4e00-\u9fff], "请直接回答选项字母。";
   one user turn of the model's own template, no system prompt; the image padded to square with the mean colour.
3. Greedy decoding, at most 100 new tokens, stopping at the template's stop tokens.
4. Score (`score`): a main question (index < 1e6) is right only if it and all its circular copies (index % 1e6 equal
   to it) are answered right (CircularEval); "Average" over the main questions, then one accuracy per l2-category
   (per category when the TSV has no l2-category), with XTuner's abbreviations.

Outputs, in --out (default work_dirs/mmbench/<model>/<tsv name>):
    partial-rank{R}.jsonl   answers as they are produced; a rerun of the same command skips what is there
    predictions.jsonl       every answered question: index, prediction (the raw answer), extracted, answer, hit, ...
    mmbench_result.xlsx     XTuner's table (the file to submit for a test split); written as mmbench_result.tsv with
                            the same columns when openpyxl (not a dependency) is not installed
    mmbench_result.json     dev split: {"Average": acc, "<category>": acc, ...}, values in [0, 1], as XTuner writes it

Deliberate differences from XTuner (README):
* Answer letters are extracted by the documented rules of `extract_choice`, not by XTuner's first run of [A-D]
  anywhere ("Answer: B" -> "A" there), and options beyond D can be answered.
* The TSV is read with the csv module. Empty cells and the strings "nan"/"NaN" count as missing, like pandas' NaN;
  other strings pandas also turns into NaN ("None", "NA", "N/A", "null") stay text, so an option reading "None" is
  shown, where XTuner silently drops it.
* A row whose image cannot be decoded is reported (index and reason) and scored wrong; the run goes on.
"""

import argparse
import base64
import binascii
import csv
import io
import json
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from weights import write_json

INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CN = "请直接回答选项字母。"
CJK = re.compile("[\u4e00-\u9fff]")  # XTuner's is_cn_string: any CJK unified ideograph anywhere in the text
CIRCULAR = 1_000_000                  # circular copies of question i have index i + k * 1e6
MISSING = {"", "nan", "NaN"}          # how an empty (pandas NaN) cell appears in the TSVs

# XTuner's abbreviations (MMBenchDataset.ABBRS): MMBench l2-categories and CCBench categories
CATEGORY_ABBR = {
    "coarse_perception": "CP",
    "finegrained_perception (instance-level)": "FP-S",
    "finegrained_perception (cross-instance)": "FP-C",
    "logic_reasoning": "LR",
    "relation_reasoning": "RR",
    "attribute_reasoning": "AR",
    "sketch_reasoning": "Sketch Reasoning",
    "scenery_building": "Scenery & Building",
    "food_clothes": "Food & Clothes",
    "historical_figure": "Historical Figure",
    "traditional_show": "Traditional Show",
    "calligraphy_painting": "Calligraphy Painting",
    "cultural_relic": "Cultural Relic",
}

# columns of XTuner's mmbench_result.xlsx (the option letters go after "question")
RESULT_COLUMNS = ["question", "prediction", "category", "l2-category", "index", "split", "answer"]


class EvalError(Exception):
    """Bad input (TSV, predictions file, model path, output folder): the message says what and what to do."""


# ----------------------------------------------------------------------------------------------------------------
# Reading the TSV


@dataclass
class Question:
    index: int
    question: str
    options: dict            # {"A": text, "B": text, ...}: the non-empty option columns, in letter order
    hint: str = ""
    answer: str = ""         # "" on a test split
    category: str = ""
    l2_category: str = ""
    image: str = field(default="", repr=False)  # base64, index references already followed
    image_error: str = ""    # why there is no usable image field (a reference to a missing row), else ""


def _tsv_reader(f):
    csv.field_size_limit(2**31 - 1)  # the csv module refuses fields over 128 KiB by default; images are larger
    return csv.reader(f, delimiter="\t")


def _open_tsv(path):
    return open(path, newline="", encoding="utf-8-sig")  # -sig: a BOM would otherwise be part of "index"


def read_header(path):
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no TSV at {path}: pass --data with an MMBench / CCBench .tsv file")
    with _open_tsv(path) as f:
        header = next(_tsv_reader(f), None)
    if not header:
        raise EvalError(f"{path} is empty: expected an MMBench TSV with a header line")
    return header


def check_columns(header, required, path):
    missing = [c for c in required if c not in header]
    if missing:
        raise EvalError(f"{path}: missing column(s) {', '.join(missing)} (columns found: {', '.join(header)}). "
                        "An MMBench TSV has index, question, hint, A, B, ..., answer (dev only), category, "
                        "l2-category, image; download it again or fix the header.")


def option_letters(header):
    return [c for c in string.ascii_uppercase if c in header]


def _cell(value):
    return "" if value is None or value.strip() in MISSING else value


def read_tsv(path, required=("index", "question", "category", "image", "A")):
    """The questions of an MMBench / CCBench TSV, in file order. Raises EvalError on a structural problem."""
    header = read_header(path)
    check_columns(header, required, path)
    letters = option_letters(header)
    questions, lines = [], {}
    with _open_tsv(path) as f:
        reader = _tsv_reader(f)
        rows = [(reader.line_num, row) for row in reader if row][1:]  # [1:]: the header, read above
    for line, row in rows:
        if len(row) != len(header):
            raise EvalError(f"{path} line {line}: {len(row)} fields, the header has {len(header)} "
                            "(a tab or quote inside a field that was not quoted?)")
        r = dict(zip(header, row))
        try:
            index = int(float(r["index"]))  # float(): some exports write 12.0
        except ValueError:
            raise EvalError(f"{path} line {line}: index {r['index']!r} is not a number") from None
        if index in lines:
            raise EvalError(f"{path}: index {index} appears on lines {lines[index]} and {line}; indices must be unique")
        lines[index] = line
        questions.append(Question(
            index=index, question=r.get("question", ""),
            options={c: r[c] for c in letters if _cell(r[c])},
            hint=_cell(r.get("hint")), answer=_cell(r.get("answer")).strip(), category=r.get("category", ""),
            l2_category=_cell(r.get("l2-category")), image=r.get("image", "")))
    by_index = {q.index: q.image for q in questions}
    for q in questions:
        q.image, q.image_error = _follow_reference(q.image, by_index)
    return questions


def _follow_reference(image, by_index):
    """A field shorter than 16 characters is another row's index (XTuner's rule); follow the chain."""
    seen = []
    while len(image) < 16:
        try:
            ref = int(float(image))
        except ValueError:
            return "", f"image field {image!r} is neither base64 nor a row index"
        if ref in seen or ref not in by_index:
            return "", f"image refers to index {ref}, which is {'a loop' if ref in seen else 'not in the TSV'}"
        seen.append(ref)
        image = by_index[ref]
    return image, ""


def decode_image(q):
    """The PIL RGB image of a question, or raise ValueError with the reason (reported, the row scored wrong)."""
    from PIL import Image
    if q.image_error:
        raise ValueError(q.image_error)
    try:
        raw = base64.b64decode(q.image)
    except binascii.Error as e:
        raise ValueError(f"the image field is not valid base64 ({e})") from None
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # decode now, so a truncated file fails here and not inside a batch
        return img.convert("RGB")  # XTuner: .convert("RGB") before expand2square
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError on bad data
        raise ValueError(f"cannot decode the base64 image: {type(e).__name__}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# The prompt


def build_prompt(q):
    """The user text of one question, exactly as XTuner builds it (the template is added by data.encode_prompt)."""
    text = "<image>\n"
    if q.hint:
        text += q.hint + "\n"
    text += q.question + "\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in q.options.items())
    return text + (INSTRUCTION_CN if CJK.search(text) else INSTRUCTION_EN)


# ----------------------------------------------------------------------------------------------------------------
# Answer-letter extraction


# "answer", "correct option", ... then "is" / ":" and one letter; Chinese "答案是 B" / "答案：B"
_PHRASE = re.compile(
    r"\b(?:answer|correct (?:option|choice)|best (?:option|choice))(?![a-z])"
    r"\s*(?:is|would be|should be)?\s*[:：]?\s*[(\[]?([A-Za-z])(?![A-Za-z0-9])"
    r"|答案\s*(?:是|为|:|：)?\s*[(（\[]?([A-Za-z])(?![A-Za-z0-9])", re.IGNORECASE)
_BARE = re.compile(r"[(\[（]?([A-Za-z])[)\]）]?[.:。]?")
_LEADING = re.compile(r"[(\[（]?([A-Z])(?:[)\]）.:：,，]|$)")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9])(?!\.[A-Za-z])")
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
# after "A" or "I", these words keep it a letter ("A is correct", "A or B"); other lowercase words make it the
# English article or pronoun ("A dog runs", "I think")
_LETTER_WORDS = {"is", "was", "would", "seems", "should", "could", "might", "or", "and", "fits", "matches",
                 "describes", "best", "correctly"}


def extract_choice(text, options):
    """The option letter a free-form answer picks, or "" (no answer, or an ambiguous one).

    `options` maps the question's letters to their texts; only those letters are valid (with no options known,
    pass {L: "" for L in "ABCD"}, XTuner's letter set). The rules are tried in order; the first rule that finds
    valid letters decides: one distinct letter is the answer, two or more distinct letters ("A or B") mean no answer.

    1. bare letter: the whole answer is a letter, optionally bracketed or followed by "." or ":" ("B", "B.",
       "(B)", "[b]"); lowercase is accepted here, where it cannot be a word.
    2. answer phrase: "answer", "correct option/choice", "best option/choice", optionally "is" / "would be" /
       "should be" and ":", then a letter ("The answer is B", "Answer: (C)", "答案是B"). A lowercase letter
       counts only at the end or before punctuation ("the answer is b."), so "the answer is a dog" is no answer.
    3. leading letter: the answer starts with an uppercase letter followed by ")", "]", ".", ":" or ","
       ("B) a cat", "C. text", "(D): text").
    4. standalone letters: uppercase letters with no letter or digit on either side ("**B**", "I pick B"), not in an
       abbreviation ("U.S."); "A" and "I" followed by a lowercase word count only if that word is one of
       _LETTER_WORDS ("A is correct", "A or B"), otherwise they are read as English ("A dog", "I think").
    5. option text: with no letter anywhere, the option whose text (lowercased, punctuation removed) equals the
       answer, else the option whose text occurs in the answer as whole words (any substring for CJK); when
       several occur, options whose text is part of another matched option's text are dropped ("red" inside
       "dark red"); one left is the answer.

    XTuner takes instead the first run of capital A-D anywhere (`re.search("([A-D]+)", text)`): "Answer: B" gives
    "A", "AB" never scores, and options E+ cannot be chosen.
    """
    valid = set(options)
    text = text.strip()
    m = _BARE.fullmatch(text)
    if m:
        return _decide([m.group(1).upper()], valid)
    found = []
    for m in _PHRASE.finditer(text):
        g = 1 if m.group(1) else 2
        letter, end = m.group(g), m.end(g)
        if letter.islower() and not (end == len(text) or text[end] in ".)]:,;。）"):
            continue
        found.append(letter.upper())
    found = [x for x in found if x in valid]
    if found:
        return _decide(found, valid)
    m = _LEADING.match(text)
    if m and m.group(1) in valid:
        return m.group(1)
    found = []
    for m in _STANDALONE.finditer(text):
        letter = m.group(1)
        if letter in "AI":
            nxt = _NEXT_WORD.match(text, m.end())
            if nxt and nxt.group(1) not in _LETTER_WORDS:
                continue
        found.append(letter)
    found = [x for x in found if x in valid]
    if found:
        return _decide(found, valid)
    return _match_option_text(text, options)


def _decide(letters, valid):
    letters = {x for x in letters if x in valid}
    return letters.pop() if len(letters) == 1 else ""


def _normalize(s):
    return " ".join(re.sub(r"[^\w]+", " ", s.lower()).split())


def _match_option_text(text, options):
    answer = _normalize(text)
    norm = {letter: _normalize(opt) for letter, opt in options.items() if _normalize(opt)}
    exact = [letter for letter, opt in norm.items() if opt == answer]
    if exact:
        return exact[0] if len(exact) == 1 else ""
    inside = [letter for letter, opt in norm.items()
              if (re.search(rf"(?<!\w){re.escape(opt)}(?!\w)", answer) if opt.isascii() else opt in answer)]
    inside = [a for a in inside if not any(a != b and norm[a] in norm[b] for b in inside)]
    return inside[0] if len(inside) == 1 else ""


# ----------------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    metrics: dict         # {"Average": acc, "<category abbreviation>": acc, ...}, values in [0, 1]
    n_main: int           # main questions scored
    n_rows: int           # rows scored (main questions + circular copies)
    n_unparsed: int       # rows whose answer gave no letter
    orphans: list         # indices of circular copies whose main question has no prediction (not scored)


def score(records, by_l2):
    """CircularEval accuracy. records: dicts with index, prediction, answer, category, l2-category and options;
    each gets "extracted" and "hit" filled in. by_l2: group by l2-category (else by category), as XTuner does."""
    groups = {}
    for r in records:
        r["extracted"] = extract_choice(str(r["prediction"] or ""), r["options"])
        r["hit"] = r["extracted"] != "" and r["extracted"] == str(r["answer"]).strip()
        groups.setdefault(r["index"] % CIRCULAR, []).append(r)
    mains = [r for r in records if r["index"] < CIRCULAR]
    main_hit = {r["index"]: all(c["hit"] for c in groups[r["index"]]) for r in mains}
    main_ids = set(main_hit)
    orphans = sorted(r["index"] for r in records if r["index"] >= CIRCULAR and r["index"] % CIRCULAR not in main_ids)
    metrics = {"Average": sum(main_hit.values()) / len(mains) if mains else 0.0}
    key = "l2-category" if by_l2 else "category"
    per_cat = {}
    for r in mains:
        per_cat.setdefault(r[key], []).append(main_hit[r["index"]])
    for cat in sorted(per_cat):  # XTuner sorts the raw names, then abbreviates
        metrics[CATEGORY_ABBR.get(cat, cat)] = sum(per_cat[cat]) / len(per_cat[cat])
    return Scores(metrics, len(mains), len(records), sum(r["extracted"] == "" for r in records), orphans)


def format_table(metrics, title):
    """Plain-text table, accuracies x100 with one decimal (XTuner prints the same numbers with rich)."""
    width = max([len("Category")] + [len(k) for k in metrics]) + 2
    rule = "-" * (width + 12)
    lines = [title, rule, f"{'Category':<{width}}{'Accuracy (%)':>12}", rule]
    for i, (name, acc) in enumerate(metrics.items()):
        lines.append(f"{name:<{width}}{acc * 100:>12.1f}")
        if i == 0:
            lines.append(rule)
    return "\n".join(lines + [rule])


# ----------------------------------------------------------------------------------------------------------------
# Predictions and result files


def question_record(q, prediction, error=""):
    """One output row: XTuner's result columns plus our extraction, hit and error."""
    return {"index": q.index, "question": q.question, **q.options, "hint": q.hint, "prediction": prediction,
            "category": q.category, "l2-category": q.l2_category, "split": "", "answer": q.answer,
            "options": dict(q.options), "error": error}


def read_jsonl(path):
    """Records of a jsonl file; a line cut short by a kill (the last one) is skipped with a note."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                print(f"note: {path} line {n} is incomplete (a run was killed while writing it); it is ignored")
    return out


def read_table(path):
    """Rows of a predictions table: .jsonl, .tsv, .csv, or .xlsx (needs openpyxl)."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no predictions file at {path}")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".xlsx":
        try:
            import openpyxl
        except ImportError:
            raise EvalError(f"{path}: reading .xlsx needs openpyxl (pip install openpyxl), or pass the .tsv") from None
        rows = list(openpyxl.load_workbook(path, read_only=True).active.iter_rows(values_only=True))
        header = [str(h) for h in rows[0]]
        return [{k: ("" if v is None else v) for k, v in zip(header, r)} for r in rows[1:]]
    csv.field_size_limit(2**31 - 1)
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f, delimiter="," if path.suffix == ".csv" else "\t"))


def records_from_predictions(rows, path, questions=None):
    """Scoring records from a predictions table; answers, categories and options come from the TSV's questions
    when given, else from the table itself (our predictions.jsonl and XTuner's xlsx hold them)."""
    if rows and ("index" not in rows[0] or "prediction" not in rows[0]):
        raise EvalError(f"{path}: a predictions table needs the columns index and prediction "
                        f"(found: {', '.join(rows[0])})")
    by_index = {q.index: q for q in questions} if questions is not None else None
    records = []
    for r in rows:
        index = int(float(r["index"]))
        pred = "" if r["prediction"] is None else str(r["prediction"])
        if by_index is not None:
            if index not in by_index:
                raise EvalError(f"{path}: index {index} is not in the TSV given with --data (another split?)")
            rec = question_record(by_index[index], pred)
        else:
            if _cell(str(r.get("answer") or "")) == "":
                raise EvalError(f"{path}: index {index} has no answer; pass --data with the dev TSV it came from")
            options = r.get("options") or {c: str(r[c]) for c in string.ascii_uppercase
                                           if c in r and _cell(str(r[c] or ""))}
            rec = {"index": index, "prediction": pred, "answer": str(r["answer"]).strip(),
                   "category": str(r.get("category") or ""), "l2-category": _cell(str(r.get("l2-category") or "")),
                   "options": options or {c: "" for c in "ABCD"}}  # no options known: XTuner's A-D
        records.append(rec)
    return records


def write_jsonl(path, records):
    """The records as jsonl (options as flat letter columns, as in XTuner's table)."""
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "options"}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a kill leaves the previous file, never half of a new one


def write_result_table(out_dir, records):
    """XTuner's mmbench_result.xlsx, or mmbench_result.tsv with the same columns when openpyxl is missing."""
    letters = sorted({c for r in records for c in r.get("options", {})})
    columns = RESULT_COLUMNS[:1] + letters + RESULT_COLUMNS[1:]
    rows = [[r.get(c, "") for c in columns] for r in records]
    try:
        import openpyxl
    except ImportError:
        path = Path(out_dir) / "mmbench_result.tsv"
        with open(str(path) + ".tmp", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter="\t", lineterminator="\n")
            writer.writerow(columns)
            writer.writerows(rows)
        os.replace(str(path) + ".tmp", path)
        return path, "openpyxl is not installed, so the table is a .tsv with the columns of XTuner's xlsx " \
                     "(pip install openpyxl to get mmbench_result.xlsx)"
    path = Path(out_dir) / "mmbench_result.xlsx"
    illegal = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters an xlsx cell cannot hold
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(columns)
    for row in rows:
        ws.append([illegal.sub("", v) if isinstance(v, str) else v for v in row])
    wb.save(str(path) + ".tmp")
    os.replace(str(path) + ".tmp", path)
    return path, ""


def report(records, out_dir, by_l2, title, dev=True):
    """Score (dev split) and print the table; write predictions.jsonl, the result table and (dev) the json to
    out_dir unless it is None. Returns the Scores (None on a test split)."""
    records = sorted(records, key=lambda r: r["index"])
    bad = [r for r in records if r.get("error")]
    if bad:
        print(f"{len(bad)} row(s) had no usable image and are scored wrong:")
        for r in bad:
            print(f"  index {r['index']}: {r['error']}")
    scores = score(records, by_l2) if dev else None
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_jsonl(out_dir / "predictions.jsonl", records)
        table, note = write_result_table(out_dir, records)
        if note:
            print(f"note: {note}")
    if not dev:
        if out_dir is not None:
            print(f"test split: {len(records)} answers in {table}; submit it to the MMBench evaluation server")
        return None
    if scores.orphans:
        print(f"note: {len(scores.orphans)} circular copies have no main question among the predictions "
              f"and are not scored (e.g. index {scores.orphans[0]})")
    print(format_table(scores.metrics, title))
    print(f"{scores.n_main} questions ({scores.n_rows} rows with circular copies); a letter was extracted from "
          f"{scores.n_rows - scores.n_unparsed} of {scores.n_rows} answers (rules: eval_mmbench.extract_choice, "
          "no ChatGPT helper)")
    if out_dir is not None:
        write_json(out_dir / "mmbench_result.json", scores.metrics)
        print(f"results in {out_dir}: predictions.jsonl, {table.name}, mmbench_result.json")
    return scores


# ----------------------------------------------------------------------------------------------------------------
# The run: shard, answer, append, resume, merge


def done_predictions(out_dir):
    """{index: partial record} from every rank's partial file (any world size)."""
    done = {}
    for path in sorted(Path(out_dir).glob("partial-rank*.jsonl")):
        for r in read_jsonl(path):
            done[int(r["index"])] = r
    return done


def _open_for_append(path):
    """Open a partial file for appending, first cutting a line that a kill left without its newline."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")


def answer_questions(questions, generate_fn, out_dir, batch_size=8, rank=0, world_size=1, barrier=lambda: None):
    """Answer the questions not yet in out_dir's partial files, this rank's strided share of them, appending
    each batch's answers to partial-rank{rank}.jsonl. Returns {index: partial record} of all ranks (every rank
    has finished when it returns).

    generate_fn(prompts: list[str], images: list[PIL.Image]) -> list[str] is the only contact with the model.
    """
    from tqdm import tqdm
    out_dir = Path(out_dir)
    done = done_predictions(out_dir)
    barrier()  # every rank has read the same done set before any rank appends, so the shards agree
    todo = [q for q in questions if q.index not in done]
    mine = todo[rank::world_size]
    if rank == 0 and done:
        print(f"resuming: {len(done)} questions already answered in {out_dir}, {len(todo)} to go")
    t0 = time.perf_counter()
    with _open_for_append(out_dir / f"partial-rank{rank}.jsonl") as f, \
            tqdm(total=len(mine), unit="q", disable=rank != 0 or not mine, dynamic_ncols=True,
                 desc="mmbench" if world_size == 1 else f"mmbench (rank 0 of {world_size})") as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start:start + batch_size]
            results, good, images = {}, [], []
            for q in batch:
                try:
                    images.append(decode_image(q))
                    good.append(q)
                except ValueError as e:
                    results[q.index] = {"index": q.index, "prediction": "", "error": str(e)}
                    bar.write(f"index {q.index}: {e} (scored wrong)", file=sys.stdout)
            if good:
                answers = generate_fn([build_prompt(q) for q in good], images)
                results.update({q.index: {"index": q.index, "prediction": a} for q, a in zip(good, answers)})
            for q in batch:
                f.write(json.dumps(results[q.index], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())  # what is on disk is what a rerun skips
            bar.update(len(batch))
    if rank == 0 and mine:
        dt = time.perf_counter() - t0
        print(f"answered {len(mine)} questions in {dt:.0f} s ({len(mine) / dt:.2f} questions/s on rank 0)")
    barrier()
    return done_predictions(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# The model (the only part that touches it)


def load_generator(model_dir, device, dtype, max_new_tokens=100):
    """Load a model (any layout model.load_model reads) and return (generate_fn, cfg) for answer_questions."""
    import torch
    import model as llava
    net, tok, cfg = llava.load_model(model_dir, dtype=dtype, device=device)
    if torch.device(device).type == "cuda" and not net.llm.unfusable_projections():
        # the model is only answered with: q/k/v and gate/up each read as one matrix (bench/chat_bench.py); an
        # adapter run keeps its LoRA / NF4 layers apart
        net.llm.fuse_projections()
    return make_generator(net, tok, cfg, device, dtype, max_new_tokens), cfg


def make_generator(net, tok, cfg, device, dtype, max_new_tokens=100):
    """generate_fn(prompts, images) -> answers, for a loaded model.

    Each batch: data.encode_prompt builds one user turn of the model's template (BOS, header, the text with the
    image positions, the assistant header; no system prompt), clip.preprocess pads the image to square with the mean
    colour (as XTuner's mmbench does, whatever the training image mode), model.generate decodes greedily from a
    left-padded batch until the template's stop tokens, and the answer is decoded without special tokens.
    """
    import torch
    import clip
    import data
    import model as llava
    net.eval()
    template = data.get_template(cfg.get("template", "llama3_chat"))
    stop_ids = data.stop_token_ids(tok, template)  # Llama-3: <|eot_id|>, <|end_of_text|>
    stop_ids += [i for i in getattr(tok, "stop_ids", ()) if i not in stop_ids]
    size, image_tokens = cfg.get("image_size", 336), cfg.get("image_tokens", 576)

    # on a GPU each decode step replays a CUDA graph and the host looks at the tokens every 8 steps
    # (bench/chat_bench.py); the cache length is rounded up to 512 so that batches share a cache and its graph
    graph_step = llava.GraphedDecodeStep() if torch.device(device).type == "cuda" else None

    def generate_fn(prompts, images):
        ids = [data.encode_prompt(tok, template, p, image_tokens=image_tokens) for p in prompts]
        pixels = torch.stack([clip.preprocess(im, size, pad_to_square=True) for im in images])  # (B, 3, S, S)
        need = max(len(i) for i in ids) + max_new_tokens
        fast = dict(step_fn=graph_step, sync_every=8, max_cache_len=-(-need // 512) * 512) if graph_step else {}
        with torch.inference_mode():
            out = llava.generate(net, ids, pixels.to(device=device, dtype=dtype), max_new_tokens=max_new_tokens,
                                 temperature=0.0, stop_ids=stop_ids, **fast)
        return [tok.decode(o, skip_special=True).strip() for o in out]

    return generate_fn


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="MMBench / CCBench TSV (MMBench_DEV_EN.tsv, MMBench_TEST_CN.tsv, CCBench.tsv, ...)")
    p.add_argument("--model", default=None, help="model folder in any supported layout (default: runs/latest)")
    p.add_argument("--out", default=None, help="work folder (default: work_dirs/mmbench/<model>/<tsv name>)")
    p.add_argument("--score", metavar="PREDICTIONS", default=None,
                   help="score this predictions table (index, prediction columns; .jsonl, .tsv, .csv, .xlsx) without "
                        "a model; answers and categories from --data when given, else from the table. Prints the "
                        "table; writes files only with --out")
    p.add_argument("--limit", type=int, default=None, help="only the first N rows of the TSV")
    p.add_argument("--batch-size", type=int, default=8, help="questions per batched greedy generation")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def _model_tag(model_dir):
    """A folder name for the model: our run layout ends in .../<run>/model, so the run's name says more."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


def _check_work_dir(out_dir, fingerprint, rank):
    """A work folder belongs to one model, TSV and decoding setup; resuming into another's would mix answers."""
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if diff:
            raise EvalError(f"{out_dir} holds answers of another evaluation (different {', '.join(diff)}: "
                            f"{ {k: old.get(k) for k in diff} }); pass another --out, or delete the folder")
    elif rank == 0:
        write_json(path, fingerprint)


def main(argv=None, load_fn=load_generator):
    """Evaluate (or with --score, re-score). load_fn(model_dir, device, dtype, max_new_tokens) -> (generate_fn,
    cfg) is replaceable for tests; it is called only after the TSV and the model path have been checked."""
    args = parse_args(argv)
    if args.score:
        questions = read_tsv(args.data, required=("index", "answer", "category")) if args.data else None
        rows = read_table(args.score)
        records = records_from_predictions(rows, args.score, questions)
        by_l2 = ("l2-category" in read_header(args.data)) if args.data else any(r["l2-category"] for r in records)
        return report(records, args.out, by_l2, f" MMBench ({args.data or args.score}) ")  # files only with --out
    if not args.data:
        raise EvalError("pass --data TSV (an MMBench / CCBench file), or --score PREDICTIONS to re-score")
    header = read_header(args.data)
    check_columns(header, ("index", "question", "category", "image", "A"), args.data)  # before any model loads
    model_dir = Path(args.model or "runs/latest")
    if not model_dir.exists():
        raise EvalError(f"no model at {model_dir}: train one first (it links runs/latest to its model/ folder), "
                        "or pass --model DIR (a run's model/ folder, an HF LLaVA folder, an XTuner or LLaVA export)")
    questions = read_tsv(args.data)
    if args.limit is not None:
        questions = questions[:args.limit]
    dev = "answer" in header and any(q.answer for q in questions)
    by_l2 = "l2-category" in header

    import torch
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        import datetime
        import torch.distributed as dist
        # gloo: the ranks only wait for each other (no tensors move), and gloo exists in every torch build
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    barrier = torch.distributed.barrier if world_size > 1 else (lambda: None)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    else:
        device = "cpu"
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]

    out_dir = Path(args.out or Path("work_dirs/mmbench") / _model_tag(model_dir) / Path(args.data).stem)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model": str(model_dir.resolve()), "data": str(Path(args.data).resolve()),
                   "max_new_tokens": args.max_new_tokens, "dtype": dtype_name}
    _check_work_dir(out_dir, fingerprint, rank)

    generate_fn, cfg = load_fn(model_dir, device, dtype, args.max_new_tokens)
    if rank == 0:
        print(f"MMBench: {args.data} ({len(questions)} rows, {'dev' if dev else 'test'} split) -> {out_dir}\n"
              f"model {model_dir.resolve()} | template {cfg.get('template')} | no system prompt | image padded to "
              f"square (mean colour), {cfg.get('image_size')} px, {cfg.get('image_tokens')} positions | select layer "
              f"{cfg.get('select_layer', -2)} | {dtype_name} | greedy, <= {args.max_new_tokens} new tokens | "
              f"batch {args.batch_size} x {world_size} rank(s)")
    done = answer_questions(questions, generate_fn, out_dir, args.batch_size, rank, world_size, barrier)
    result = None
    if rank == 0:
        missing = [q.index for q in questions if q.index not in done]
        if missing:
            print(f"warning: {len(missing)} questions have no answer (a rank stopped early?), e.g. index "
                  f"{missing[0]}; run the same command again to answer them")
        records = [question_record(q, done[q.index].get("prediction", ""), done[q.index].get("error", ""))
                   for q in questions if q.index in done]
        result = report(records, out_dir, by_l2, f" MMBench ({args.data}) ", dev=dev)
    if world_size > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        sys.exit(f"eval_mmbench: {e}")
