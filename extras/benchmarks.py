"""What a benchmark TSV holds: VLMEvalKit's TSV format read without pandas, and the kind of benchmark told from the
file's name and columns, with the words each kind's prompt adds (eval_mmbench.build_prompt puts them together as
VLMEvalKit asks XTuner's LLaVA models, vlmeval/vlm/llava/llava_xtuner.py; its multiple-choice prompt is also XTuner's
own `xtuner mmbench`).

Three kinds (`--kind` says it explicitly; otherwise the name decides, then the columns):

    kind  benchmarks (the TSV's name, as VLMEvalKit downloads it)                     prompt after "<image>\n"
    mcq   MMBench_{DEV,TEST}_{EN,CN}[_V11], CCBench, SEEDBench_IMG, ScienceQA_{VAL,    [hint \n] question \n A. .. \n
          TEST}, AI2D_TEST, MMStar, MMMU_DEV_VAL, RealWorldQA; any TSV with an A column  B. .. \n + letter instruction
    yorn  MME, POPE, HallusionBench; any TSV whose answers are all Yes / No          the question as the TSV words it
    vqa   TextVQA_VAL, GQA_TestDev_Balanced; any other TSV                           question + "\nAnswer the question
                                                                                     using a single word or phrase."

The scoring rules (`Benchmark.rules`, extras.scoring) follow the name: "mmbench" (MMBench, CCBench, and any other
multiple-choice TSV: CircularEval over the copies with index >= 1e6, XTuner's protocol), "mmmu", "plain" (the other
named multiple-choice sets), "mme", "pope", "hallusion", "yorn" (another yes/no set), "textvqa", "gqa", "vqa".

The TSV: index, question, answer (absent on a test split), category, l2-category, split, hint and option columns
A, B, ... where the benchmark has them; the picture as base64 in `image`, or a file in `image_path` (absolute or
relative to the TSV's folder) when there is no image column. A list of pictures ("['...', '...']", MMMU) is
answered with its first one, as VLMEvalKit does for a model that takes one image (the "<image 1>" marks stay in the
question's text). An image cell of at most 64 characters that names another row's index shares that row's picture
(MMBench's circular copies, MME's question pairs). A row with an empty image cell is left out, as VLMEvalKit does.
"""

import ast
import base64
import binascii
import csv
import io
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from extras.mmbench import EvalError, cell, parse_index

KINDS = ("mcq", "yorn", "vqa")
INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CN = "请直接回答选项字母。"
CJK = re.compile("[\u4e00-\u9fff]")  # XTuner's is_cn_string: any CJK unified ideograph anywhere in the text
VQA_INSTRUCTION = "\nAnswer the question using a single word or phrase."  # VLMEvalKit's ImageVQADataset
REFERENCE_LENGTH = 64  # VLMEvalKit: an image cell this short is another row's index, not a picture

# (substring of the lowercased file name, kind, rules), first match wins: VLMEvalKit picks its scorer by name too
NAMED = [("mmbench", "mcq", "mmbench"), ("ccbench", "mcq", "mmbench"), ("circular", "mcq", "mmbench"),
         ("mmmu", "mcq", "mmmu"), ("seedbench", "mcq", "plain"), ("scienceqa", "mcq", "plain"),
         ("ai2d", "mcq", "plain"), ("mmstar", "mcq", "plain"), ("realworldqa", "mcq", "plain"),
         ("hallusion", "yorn", "hallusion"), ("pope", "yorn", "pope"), ("mme", "yorn", "mme"),
         ("textvqa", "vqa", "textvqa"), ("gqa", "vqa", "gqa")]
GENERIC = {"mcq": "mmbench", "yorn": "yorn", "vqa": "vqa"}  # the rules of an unnamed TSV of each kind


@dataclass
class Question:
    index: object            # int, or str where the TSV's indices are names (HallusionBench)
    question: str
    options: dict = field(default_factory=dict)  # {"A": text, ...}: the non-empty option columns, in letter order
    hint: str = ""
    answer: str = ""         # "" on a test split; VQA: one answer or a list literal of the references
    category: str = ""
    l2_category: str = ""
    split: str = ""
    image: str = field(default="", repr=False)  # base64 (the first of a list), index references already followed
    image_file: str = ""     # the picture's file, for a TSV with image_path and no image column
    image_key: str = ""      # which picture: image_path where the TSV has it, else the index of the row holding it
    image_error: str = ""    # why there is no usable picture (a reference to a missing row), else ""


@dataclass
class Benchmark:
    path: Path
    name: str                # the TSV's file name without .tsv: MMBench_DEV_EN
    kind: str                # "mcq", "yorn" or "vqa"
    rules: str               # the scorer (module docstring)
    header: list
    questions: list
    no_image: list           # indices of the rows left out for having no picture
    dev: bool                # the TSV holds answers (a test split does not)


def _tsv_lines(path):
    """(line number, fields) of each line of a TSV; a blank line has no fields."""
    csv.field_size_limit(2**31 - 1)  # the csv module refuses fields over 128 KiB by default; images are larger
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM would otherwise be part of "index"
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            yield reader.line_num, row


def read_header(path):
    if not Path(path).is_file():
        raise EvalError(f"no TSV at {path}: pass --data with a benchmark .tsv file (VLMEvalKit's format)")
    header = next(_tsv_lines(path), (0, None))[1]
    if not header:
        raise EvalError(f"{path} is empty: expected a benchmark TSV with a header line")
    return header


def read_benchmark(path, kind=None, required=("index", "question"), images=True):
    """The benchmark in a TSV: its kind and rules, and its questions in file order. Raises EvalError on a structural
    problem (a missing column, a line with the wrong number of fields, a repeated index), before any model loads."""
    header = read_header(path)
    named = next(((k, rules) for word, k, rules in NAMED if word in Path(path).stem.lower()), None)
    kind = kind or (named[0] if named else _kind_from_columns(path, header))
    rules = named[1] if named and named[0] == kind else GENERIC[kind]
    required = list(required) + (["A"] if kind == "mcq" and images else [])
    missing = [c for c in required if c not in header]
    if images and "image" not in header and "image_path" not in header:
        missing.append("image (or image_path)")
    if missing:
        raise EvalError(f"{path}: missing column(s) {', '.join(missing)} (columns found: {', '.join(header)}). "
                        "A benchmark TSV has index, question, [hint, A, B, ...], answer (not on a test split), "
                        "category, image; download it again or fix the header.")
    rows = []
    for line, row in [(n, row) for n, row in _tsv_lines(path) if row][1:]:  # [1:]: the header, read above
        if len(row) != len(header):
            raise EvalError(f"{path} line {line}: {len(row)} fields, the header has {len(header)} "
                            "(a tab or quote inside a field that was not quoted?)")
        rows.append((line, dict(zip(header, row))))
    if not rows:  # scored, it would read as 0% of nothing
        raise EvalError(f"{path}: no questions, only a header line")
    # indices: numbers where every row's is one (12.0 included), else names, as VLMEvalKit keeps them
    numeric = all(isinstance(parse_index(r["index"]), int) for _, r in rows)
    lines = {}
    for line, r in rows:
        r["index"] = parse_index(r["index"]) if numeric else r["index"].strip()
        if r["index"] in lines:
            raise EvalError(f"{path}: index {r['index']} appears on lines {lines[r['index']]} and {line}; indices "
                            "must be unique")
        lines[r["index"]] = line
    by_key = {str(r["index"]): r.get("image", "") for _, r in rows}
    letters = [c for c in string.ascii_uppercase if c in header]
    questions, no_image = [], []
    for _, r in rows:
        image, image_file, key, error = _picture(r, by_key, Path(path).parent)
        if images and not (image or image_file or error):
            no_image.append(r["index"])
            continue
        questions.append(Question(
            index=r["index"], question=r.get("question", ""), options={c: r[c] for c in letters if cell(r[c])},
            hint=cell(r.get("hint")), answer=cell(r.get("answer")).strip(), category=cell(r.get("category")),
            l2_category=cell(r.get("l2-category")), split=cell(r.get("split")), image=image, image_file=image_file,
            image_key=key, image_error=error))
    return Benchmark(Path(path), Path(path).stem, kind, rules, header, questions, no_image,
                     any(q.answer for q in questions))


def read_tsv(path, kind="mcq"):
    """The questions of a TSV (by default a multiple-choice one: MMBench, CCBench), in file order."""
    return read_benchmark(path, kind).questions


def _kind_from_columns(path, header):
    """An unnamed TSV: multiple choice when it has option columns, yes/no when every answer is Yes or No."""
    if "A" in header:
        return "mcq"
    answers = {cell(dict(zip(header, row)).get("answer")).strip() for _, row in list(_tsv_lines(path))[1:] if row}
    return "yorn" if answers and answers <= {"Yes", "No"} else "vqa"


def as_list(value):
    """A cell holding a Python list literal ("['a', 'b']", VLMEvalKit writes them so) as a list, else None."""
    if not value.startswith("["):
        return None
    try:
        items = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return None
    return [str(x) for x in items] if isinstance(items, list) and items else None


def _picture(r, by_key, folder):
    """(base64, file, key, error) of one row's picture: index references followed, a list's first picture. `key`
    names the picture (MME pairs its questions by it): image_path where the TSV has one, else the row holding it."""
    path = cell(r.get("image_path"))
    key = path or str(r["index"])
    if "image" not in r:  # pictures as files
        return "", str(folder / (as_list(path) or [path])[0]) if path else "", key, ""
    image, seen = r["image"].strip(), [str(r["index"])]
    while 0 < len(image) <= REFERENCE_LENGTH and (str(parse_index(image)) in by_key or image.isdigit()):
        ref = str(parse_index(image))
        if ref not in by_key or ref in seen:
            return "", "", key, f"image refers to index {ref}, which is {'a loop' if ref in seen else 'not in the TSV'}"
        seen.append(ref)
        image = by_key[ref].strip()
    listed = as_list(image)
    return cell(listed[0] if listed else image), "", path or seen[-1], ""


def decode_image(q):
    """The PIL RGB image of a question, or raise ValueError with the reason (reported, the row scored wrong)."""
    if q.image_error:
        raise ValueError(q.image_error)
    if q.image_file:
        try:
            return _load(Path(q.image_file).read_bytes())
        except OSError as e:
            raise ValueError(f"cannot read the image file: {e}") from None
    try:
        raw = base64.b64decode(q.image)
    except binascii.Error as e:
        raise ValueError(f"the image field is not valid base64 ({e})") from None
    return _load(raw)


def _load(raw):
    try:
        img = Image.open(io.BytesIO(raw))
        img.load()  # decode now, so a truncated file fails here and not inside a batch
        return img.convert("RGB")  # XTuner: .convert("RGB") before expand2square
    except Exception as e:  # PIL raises OSError, ValueError, SyntaxError or DecompressionBombError on bad data
        raise ValueError(f"cannot decode the image: {type(e).__name__}: {e}") from None
