r"""MMBench / CCBench evaluation by XTuner's protocol (`xtuner mmbench`, xtuner/tools/mmbench.py, v0.2.0).

    python eval_mmbench.py --data MMBench_DEV_EN.tsv                    # the newest trained model (runs/latest)
    python eval_mmbench.py --data MMBench_DEV_EN.tsv --model DIR --limit 50 --batch-size 16
    torchrun --nproc_per_node 8 eval_mmbench.py --data MMBench_DEV_EN.tsv   # data parallel, one shard per rank
    python eval_mmbench.py --score OUT/predictions.jsonl [--data TSV]   # re-score a predictions file, no model

1. Read the TSV (`read_tsv`): index, question, hint, A, B, ... (any single-capital-letter column), answer (dev split
   only), category, l2-category, image (base64; a value shorter than 16 characters is the index of another row
   whose image it shares, as in the circular TSVs).
2. Prompt (`build_prompt`): "<image>\n" [hint "\n"] question "\n" "A. ...\n" ... then "Answer with the option's letter
   from the given choices directly." or, when the text holds a CJK character [\u4e00-\u9fff], "请直接回答选项字母。";
   one user turn of the model's own template, no system prompt; the image padded to square with the mean colour.
3. Answer (`answer_questions`): greedy, batched, at most 100 new tokens, stopping at the template's stop tokens.
4. Score (`score`): the answer's letter (`extract_choice`); a main question (index < 1e6) is right only if it and all
   its circular copies (index % 1e6 equal to it) are answered right (CircularEval); "Average" over the main
   questions, then one accuracy per l2-category (per category when the TSV has no l2-category), XTuner's names.

Outputs, in --out (default work_dirs/mmbench/<model>/<tsv name>):
    partial-rank{R}.jsonl   answers as they are produced; a rerun of the same command skips what is there
    predictions.jsonl       every answered question: index, prediction (the raw answer), extracted, answer, hit, ...
    mmbench_result.xlsx     XTuner's table (the file to submit for a test split); written as mmbench_result.tsv with
                            the same columns when openpyxl (not a dependency) is not installed
    mmbench_result.json     dev split: {"Average": acc, "<category>": acc, ...}, values in [0, 1], as XTuner writes it
The letter extraction, the prediction tables and the work folder live in extras/mmbench.py.

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
import datetime
import io
import json
import os
import re
import string
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import clip
import data
import extras.loader
import model as llava
from extras import mmbench as files
from extras.fast_inference import GraphedDecodeStep, fuse_projections, unfusable_projections
from extras.mmbench import CATEGORY_ABBR, EvalError, cell, extract_choice, format_table, question_record
from weights import write_json

INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CN = "请直接回答选项字母。"
CJK = re.compile("[\u4e00-\u9fff]")  # XTuner's is_cn_string: any CJK unified ideograph anywhere in the text
CIRCULAR = 1_000_000                  # circular copies of question i have index i + k * 1e6


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


def _tsv_lines(path):
    """(line number, fields) of each line of a TSV; a blank line has no fields."""
    csv.field_size_limit(2**31 - 1)  # the csv module refuses fields over 128 KiB by default; images are larger
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a BOM would otherwise be part of "index"
        reader = csv.reader(f, delimiter="\t")
        for row in reader:
            yield reader.line_num, row


def read_header(path):
    if not Path(path).is_file():
        raise EvalError(f"no TSV at {path}: pass --data with an MMBench / CCBench .tsv file")
    header = next(_tsv_lines(path), (0, None))[1]
    if not header:
        raise EvalError(f"{path} is empty: expected an MMBench TSV with a header line")
    return header


def read_tsv(path, required=("index", "question", "category", "image", "A")):
    """The questions of an MMBench / CCBench TSV, in file order. Raises EvalError on a structural problem."""
    header = read_header(path)
    missing = [c for c in required if c not in header]
    if missing:
        raise EvalError(f"{path}: missing column(s) {', '.join(missing)} (columns found: {', '.join(header)}). "
                        "An MMBench TSV has index, question, hint, A, B, ..., answer (dev only), category, "
                        "l2-category, image; download it again or fix the header.")
    letters = [c for c in string.ascii_uppercase if c in header]
    questions, lines = [], {}
    for line, row in [(n, row) for n, row in _tsv_lines(path) if row][1:]:  # [1:]: the header, read above
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
            index=index, question=r.get("question", ""), options={c: r[c] for c in letters if cell(r[c])},
            hint=cell(r.get("hint")), answer=cell(r.get("answer")).strip(), category=r.get("category", ""),
            l2_category=cell(r.get("l2-category")), image=r.get("image", "")))
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
# Answering: batched greedy generation, sharded over ranks, appended as it goes


def answer_questions(questions, generate_fn, out_dir, batch_size=8, rank=0, world_size=1, barrier=lambda: None):
    """Answer the questions not yet in out_dir's partial files, this rank's strided share of them, appending
    each batch's answers to partial-rank{rank}.jsonl. Returns {index: partial record} of all ranks (every rank
    has finished when it returns).

    generate_fn(prompts: list[str], images: list[PIL.Image]) -> list[str] is the only contact with the model.
    """
    out_dir = Path(out_dir)
    done = files.done_predictions(out_dir)
    barrier()  # every rank has read the same done set before any rank appends, so the shards agree
    todo = [q for q in questions if q.index not in done]
    mine = todo[rank::world_size]
    if rank == 0 and done:
        print(f"resuming: {len(done)} questions already answered in {out_dir}, {len(todo)} to go")
    t0 = time.perf_counter()
    with files.open_for_append(out_dir / f"partial-rank{rank}.jsonl") as f, \
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
    return files.done_predictions(out_dir)


def load_generator(args, device, dtype):
    """Load the model the command line names (extras.loader) -> (generate_fn, cfg) for answer_questions."""
    try:
        net, tok, cfg = extras.loader.load_from_args(args, dtype, device)
    except extras.loader.LoadError as e:
        raise EvalError(str(e)) from None
    if torch.device(device).type == "cuda" and not unfusable_projections(net.llm):
        # the model is only answered with: q/k/v and gate/up each read as one matrix; an adapter run keeps its
        # LoRA / NF4 layers apart
        fuse_projections(net.llm)
    return make_generator(net, tok, cfg, device, dtype, args.max_new_tokens), cfg


def make_generator(net, tok, cfg, device, dtype, max_new_tokens=100):
    """generate_fn(prompts, images) -> answers, for a loaded model.

    Each batch: data.encode_prompt builds one user turn of the model's template (BOS, header, the text with the
    image positions, the assistant header; no system prompt), clip.preprocess pads the image to square with the mean
    colour (as XTuner's mmbench does, whatever the training image mode), model.generate decodes greedily from a
    left-padded batch until the template's stop tokens, and the answer is decoded without special tokens.
    """
    net.eval()
    template = data.get_template(cfg.get("template", "llama3_chat"))
    stop_ids = data.stop_token_ids(tok, template)  # Llama-3: <|eot_id|>, <|end_of_text|>
    stop_ids += [i for i in getattr(tok, "stop_ids", ()) if i not in stop_ids]
    size, image_tokens = cfg.get("image_size", 336), cfg.get("image_tokens", 576)

    # on a GPU each decode step replays a CUDA graph and the host looks at the tokens every 8 steps; the cache
    # length is rounded up to 512 so that batches share a cache and its graph
    graph_step = GraphedDecodeStep() if torch.device(device).type == "cuda" else None

    def generate_fn(prompts, images):
        # one image per question: a `<image>` typed in the question's own text stays text
        ids = [data.encode_prompt(tok, template, p, image_tokens=image_tokens, images=1) for p in prompts]
        pixels = torch.stack([clip.preprocess(im, size, pad_to_square=True) for im in images])  # (B, 3, S, S)
        need = max(len(i) for i in ids) + max_new_tokens
        fast = dict(step_fn=graph_step, sync_every=8, max_cache_len=-(-need // 512) * 512) if graph_step else {}
        with torch.inference_mode():
            out = llava.generate(net, ids, pixels.to(device=device, dtype=dtype), max_new_tokens=max_new_tokens,
                                 temperature=0.0, stop_ids=stop_ids, **fast)
        return [tok.decode(o, skip_special=True).strip() for o in out]

    return generate_fn


# ----------------------------------------------------------------------------------------------------------------
# Scoring and the report


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
    orphans = sorted(r["index"] for r in records if r["index"] >= CIRCULAR and r["index"] % CIRCULAR not in main_hit)
    metrics = {"Average": sum(main_hit.values()) / len(mains) if mains else 0.0}
    key = "l2-category" if by_l2 else "category"
    per_cat = {}
    for r in mains:
        per_cat.setdefault(r[key], []).append(main_hit[r["index"]])
    for cat in sorted(per_cat):  # XTuner sorts the raw names, then abbreviates
        metrics[CATEGORY_ABBR.get(cat, cat)] = sum(per_cat[cat]) / len(per_cat[cat])
    return Scores(metrics, len(mains), len(records), sum(r["extracted"] == "" for r in records), orphans)


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
        table = files.write_outputs(out_dir, records)
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
        write_json(Path(out_dir) / "mmbench_result.json", scores.metrics)
        print(f"results in {out_dir}: predictions.jsonl, {table.name}, mmbench_result.json")
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="MMBench / CCBench TSV (MMBench_DEV_EN.tsv, MMBench_TEST_CN.tsv, CCBench.tsv, ...)")
    extras.loader.add_model_arguments(p)  # --model --llm --vision --template --bf16-base --lora-alpha
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


def main(argv=None, load_fn=load_generator):
    """Evaluate (or with --score, re-score). load_fn(args, device, dtype) -> (generate_fn, cfg) is replaceable for
    tests; it is called only after the TSV and the model path have been checked, with args.model set."""
    args = parse_args(argv)
    if args.score:  # no model: the predictions table, with answers and categories from --data or from the table
        questions = read_tsv(args.data, required=("index", "answer", "category")) if args.data else None
        records = files.records_from_predictions(files.read_table(args.score), args.score, questions)
        by_l2 = ("l2-category" in read_header(args.data)) if args.data else any(r["l2-category"] for r in records)
        return report(records, args.out, by_l2, f" MMBench ({args.data or args.score}) ")  # files only with --out
    if not args.data:
        raise EvalError("pass --data TSV (an MMBench / CCBench file), or --score PREDICTIONS to re-score")
    questions = read_tsv(args.data)[:args.limit]  # before any model loads
    try:  # no --model: runs/latest, which train.py links to the newest model/ folder
        model_dir = Path(args.model) if args.model else extras.loader.latest_model_dir()
    except extras.loader.LoadError as e:
        raise EvalError(str(e)) from None
    if not model_dir.exists():
        raise EvalError(f"no model at {model_dir}: train one first (it links runs/latest to its model/ folder), "
                        "or pass --model DIR (a run's model/ folder, an HF LLaVA folder, an XTuner or LLaVA export)")
    args.model = str(model_dir)  # the folder checked and recorded in run.json is the one the loader reads
    dev = any(q.answer for q in questions)
    by_l2 = "l2-category" in read_header(args.data)

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if world_size > 1:
        # gloo: the ranks only wait for each other (no tensors move), and gloo exists in every torch build
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=6))
    barrier = dist.barrier if world_size > 1 else (lambda: None)
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device != "cpu":
        torch.cuda.set_device(local_rank)
    dtype_name = args.dtype or ("bf16" if device.startswith("cuda") else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    out_dir = files.work_dir(args, model_dir, dtype_name, rank)

    generate_fn, cfg = load_fn(args, device, dtype)
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
        dist.destroy_process_group()
    return result


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        sys.exit(f"eval_mmbench: {e}")
