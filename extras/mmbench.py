"""MMBench / CCBench by XTuner's protocol, and the files every benchmark run reads and writes: the answer-letter
rules, XTuner's CircularEval and category names, prediction tables in and out, the submission xlsx, and the work
folder that makes a run resumable.

* `extract_choice`: the option letter a free-form answer picks, by documented rules (XTuner takes the first run of
  capital A-D anywhere in the answer instead; VLMEvalKit's matching is extras.scoring.vlmevalkit_choice).
* `score`: XTuner's CircularEval accuracy, "Average" then one accuracy per l2-category (or category), XTuner's
  abbreviations: the keys of mmbench_result.json.
* Records: one dict per TSV row, XTuner's result columns (index, question, the option letters, prediction, category,
  l2-category, split, answer) plus our "options", "extracted", "hit" and "error". `question_record` builds one;
  `records_from_predictions` builds them from a predictions table for `eval_mmbench.py --score`.
* Tables: our predictions.jsonl, XTuner's mmbench_result.xlsx (the MMBench server's submission format, written with
  openpyxl), and any .tsv / .csv with the columns index and prediction.
* The work folder: run.json names the model, TSV and decoding setup the answers belong to; partial-rank{R}.jsonl
  holds each rank's answers as they are produced, so a rerun of the same command skips what is there.
"""

import csv
import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

import openpyxl

from weights import atomic_write, write_json

MISSING = {"", "nan", "NaN"}  # how an empty (pandas NaN) cell appears in the TSVs
# columns of XTuner's mmbench_result.xlsx (the option letters go after "question")
RESULT_COLUMNS = ["question", "prediction", "category", "l2-category", "index", "split", "answer"]
CIRCULAR = 1_000_000  # circular copies of question i have index i + k * 1e6

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


class EvalError(Exception):
    """Bad input (TSV, predictions file, model path, output folder): the message says what and what to do."""


def cell(value):
    """A TSV or table cell with missing values ("", "nan", "NaN", None) as ""."""
    return "" if value is None or value.strip() in MISSING else value


def parse_index(value):
    """A row index as the TSVs hold it: a whole number (12, "12", "12.0") as an int, anything else as text
    (HallusionBench's indices are names)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value).strip()
    return int(number) if number.is_integer() else str(value).strip()


def index_key(value):
    """The key that finds a row whatever spelling its index has in a table ("12", 12, 12.0 and "12.0" agree)."""
    return str(parse_index(value))


def question_record(q, prediction, error=""):
    """One output row of a benchmark Question: XTuner's result columns plus our options and error (and, for the
    yes/no scorers, which picture the question is about)."""
    return {"index": q.index, "question": q.question, **q.options, "hint": q.hint, "prediction": prediction,
            "category": q.category, "l2-category": q.l2_category, "split": q.split, "answer": q.answer,
            "options": dict(q.options), "image_key": q.image_key, "error": error}


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
# XTuner's CircularEval


@dataclass
class Scores:
    metrics: dict         # the printed table: MMBench {"Average": acc, "<category>": acc, ...} (XTuner's keys)
    n_main: int           # questions scored (MMBench: main questions, without their circular copies)
    n_rows: int           # rows scored (main questions + circular copies)
    n_unparsed: int       # rows whose answer gave no letter / no yes or no
    orphans: list = field(default_factory=list)  # circular copies whose main question has no prediction
    result: dict = field(default_factory=dict)   # <name>_result.json: every metric (extras.scoring)
    headline: str = ""    # the benchmark's cell in the summary table


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
    orphans = sorted(r["index"] for r in records if r["index"] >= CIRCULAR and r["index"] % CIRCULAR not in main_hit)
    metrics = {"Average": sum(main_hit.values()) / len(mains) if mains else 0.0}
    key = "l2-category" if by_l2 else "category"
    per_cat = {}
    for r in mains:
        per_cat.setdefault(r[key], []).append(main_hit[r["index"]])
    for cat in sorted(per_cat):  # XTuner sorts the raw names, then abbreviates
        metrics[CATEGORY_ABBR.get(cat, cat)] = sum(per_cat[cat]) / len(per_cat[cat])
    return Scores(metrics, len(mains), len(records), sum(r["extracted"] == "" for r in records), orphans)


# ----------------------------------------------------------------------------------------------------------------
# Reading predictions


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
    """Rows of a predictions table: .jsonl, .tsv, .csv or .xlsx."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"no predictions file at {path}")
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".xlsx":
        rows = list(openpyxl.load_workbook(path, read_only=True).active.iter_rows(values_only=True))
        header = [str(h) for h in rows[0]]
        return [{k: ("" if v is None else v) for k, v in zip(header, r)} for r in rows[1:]]
    csv.field_size_limit(2**31 - 1)  # the csv module refuses fields over 128 KiB by default
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f, delimiter="," if path.suffix == ".csv" else "\t"))


def records_from_predictions(rows, path, questions=None):
    """Scoring records from a predictions table; answers, categories and options come from the TSV's questions
    when given, else from the table itself (our predictions.jsonl and XTuner's xlsx hold them: MMBench only).
    A row that cannot be scored (an index the TSV lacks, no answer) is reported and left out; when no row can be,
    the first one's reason is the error."""
    if rows and ("index" not in rows[0] or "prediction" not in rows[0]):
        raise EvalError(f"{path}: a predictions table needs the columns index and prediction "
                        f"(found: {', '.join(rows[0])})")
    by_key = {index_key(q.index): q for q in questions} if questions is not None else None
    records, bad = [], []
    for line, r in enumerate(rows, 2):
        pred = "" if r["prediction"] is None else str(r["prediction"])
        index = parse_index(r["index"])
        if by_key is not None:
            if str(index) not in by_key:
                bad.append(f"row {line}: index {index} is not in the TSV given with --data (another split?)")
            else:
                records.append(question_record(by_key[str(index)], pred))
        elif not isinstance(index, int):
            bad.append(f"row {line}: index {index!r} is not a number; pass --data with the TSV it came from")
        elif cell(str(r.get("answer") or "")) == "":
            bad.append(f"index {index} has no answer; pass --data with the dev TSV it came from")
        else:
            options = r.get("options") or {c: str(r[c]) for c in string.ascii_uppercase
                                           if c in r and cell(str(r[c] or ""))}
            records.append({"index": index, "prediction": pred, "answer": str(r["answer"]).strip(),
                            "category": str(r.get("category") or ""), "split": str(r.get("split") or ""),
                            "l2-category": cell(str(r.get("l2-category") or "")),
                            "options": options or {c: "" for c in "ABCD"}})  # no options known: XTuner's A-D
    if bad and not records:
        raise EvalError(f"{path}: {bad[0]}")
    if bad:
        print(f"note: {len(bad)} row(s) of {path} are left out, e.g. {bad[0]}")
    return records


# ----------------------------------------------------------------------------------------------------------------
# The printed table, predictions.jsonl and the submission table


def format_table(metrics, title, scale=100, unit="Accuracy (%)", totals=1):
    """Plain-text table, one decimal (XTuner prints the same numbers with rich). metrics: {row: value} (one
    column, `unit`), or {row: {column: value}} (POPE's F1, precision, ...; HallusionBench's aAcc, ...). Values
    are multiplied by `scale` (100: fractions shown as percentages); a rule follows the first `totals` rows."""
    columns = next((list(v) for v in metrics.values() if isinstance(v, dict)), None)
    rows = {k: (v if columns else {unit: v}) for k, v in metrics.items()}
    columns = columns or [unit]
    width = max([len("Category")] + [len(str(k)) for k in metrics]) + 2
    cols = [max(len(c) + 2, 12) for c in columns]
    rule = "-" * (width + sum(cols))
    head = f"{'Category':<{width}}" + "".join(f"{c:>{w}}" for c, w in zip(columns, cols))
    lines = [title, rule, head, rule]
    for i, (name, values) in enumerate(rows.items()):
        lines.append(f"{name:<{width}}" + "".join(
            f"{values[c] * scale:>{w}.1f}" if isinstance(values.get(c), (int, float)) else f"{'-':>{w}}"
            for c, w in zip(columns, cols)))
        if i == totals - 1 and len(rows) > totals:
            lines.append(rule)
    return "\n".join(lines + [rule])


def write_jsonl(path, records):
    """The records as jsonl (options as flat letter columns, as in XTuner's table)."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:  # a kill leaves the previous file
        for r in records:
            f.write(json.dumps({k: v for k, v in r.items() if k != "options"}, ensure_ascii=False) + "\n")


def write_result_table(out_dir, records):
    """XTuner's mmbench_result.xlsx: the table the MMBench evaluation server takes for a test split."""
    letters = sorted({c for r in records for c in r.get("options", {})})
    columns = RESULT_COLUMNS[:1] + letters + RESULT_COLUMNS[1:]
    illegal = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")  # control characters an xlsx cell cannot hold
    wb = openpyxl.Workbook()
    ws = wb.active
    ws.append(columns)
    for r in records:
        ws.append([illegal.sub("", v) if isinstance(v, str) else v for v in (r.get(c, "") for c in columns)])
    path = Path(out_dir) / "mmbench_result.xlsx"
    with atomic_write(path) as tmp:
        wb.save(str(tmp))
    return path


def write_outputs(out_dir, records, submission=True):
    """predictions.jsonl and (MMBench / CCBench) the xlsx table in out_dir (created if needed); returns the files'
    names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl(out_dir / "predictions.jsonl", records)
    return ["predictions.jsonl"] + ([write_result_table(out_dir, records).name] if submission else [])


# ----------------------------------------------------------------------------------------------------------------
# The work folder: which evaluation it belongs to, and the answers so far


def model_tag(model_dir):
    """A model's short name: the run's name for our run layout (.../<run>/model), else the folder's."""
    path = Path(model_dir).resolve()
    return path.parent.name if path.name == "model" else path.name


def work_dir(args, data, model_dir, dtype_name, kind, rank):
    """(work folder, results folder) of one benchmark, created. The results folder is --out (default
    work_dirs/mmbench/<model>); the work folder is --out itself when it was given with one --data, else
    <results folder>/<tsv name>. A work folder belongs to one model, TSV, kind and decoding setup, recorded in
    run.json: resuming into another evaluation's folder would mix answers, so that is refused."""
    model_dir = Path(model_dir)
    root = Path(args.out or Path("work_dirs/mmbench") / model_tag(model_dir))
    out_dir = root if args.out and len(args.data) == 1 else root / Path(data).stem
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = {"model": str(model_dir.resolve()), "data": str(Path(data).resolve()), "kind": kind,
                   "max_new_tokens": args.max_new_tokens, "dtype": dtype_name}
    for key in ("llm", "vision"):  # parts loaded from elsewhere than the model folder
        if getattr(args, key, None):
            fingerprint[key] = str(Path(getattr(args, key)).resolve())
    for key in ("template", "bf16_base", "lora_alpha"):
        if getattr(args, key, None):
            fingerprint[key] = getattr(args, key)
    path = out_dir / "run.json"
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        diff = [k for k in {**old, **fingerprint} if old.get(k) != fingerprint.get(k)]
        if diff:
            raise EvalError(f"{out_dir} holds answers of another evaluation (different {', '.join(diff)}: "
                            f"{ {k: old.get(k) for k in diff} }); pass another --out, or delete the folder")
    elif rank == 0:
        write_json(path, fingerprint)
    return out_dir, root


def done_predictions(out_dir):
    """{index_key: partial record} from every rank's partial file (any world size)."""
    done = {}
    for path in sorted(Path(out_dir).glob("partial-rank*.jsonl")):
        for r in read_jsonl(path):
            done[index_key(r["index"])] = r
    return done


def open_for_append(path):
    """Open a partial file for appending, first cutting a line that a kill left without its newline."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as f:
            data = f.read()
            if not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)
    return open(path, "a", encoding="utf-8")
