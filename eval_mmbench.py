r"""Benchmark evaluation in VLMEvalKit's TSV format: multiple choice (MMBench, CCBench, SEEDBench, ScienceQA, AI2D,
MMStar, MMMU, RealWorldQA), yes / no (POPE, MME, HallusionBench) and open VQA (TextVQA, GQA); MMBench / CCBench by
XTuner's protocol (`xtuner mmbench`, xtuner/tools/mmbench.py, v0.2.0).

    python eval_mmbench.py --data MMBench_DEV_EN.tsv                    # the newest trained model (runs/latest)
    python eval_mmbench.py --data MMBench_DEV_EN.tsv --data POPE.tsv --data TextVQA_VAL.tsv --out DIR
    torchrun --nproc_per_node 8 eval_mmbench.py --data MME.tsv          # data parallel, one shard per rank
    python eval_mmbench.py --score PREDICTIONS.jsonl --data X.tsv --out DIR   # score a predictions file, no model

1. Read the TSV (extras.benchmarks): its kind (mcq, yorn, vqa) from its name, else its columns (or --kind); index,
   question, answer (dev splits), category, [l2-category, split, hint, options A, B, ...], the picture (base64, or
   a file in image_path; an index of another row shares its picture; of a list, the first is used).
2. Prompt (`build_prompt`), as VLMEvalKit asks XTuner's LLaVA: "<image>\n" then
     mcq   [hint "\n"] question "\n" "A. ...\n" ... "Answer with the option's letter from the given choices
           directly." or, when the text holds a CJK character [\u4e00-\u9fff], "请直接回答选项字母。" (XTuner's own)
     yorn  the question as the TSV words it (MME's ends "Please answer yes or no.")
     vqa   question "\nAnswer the question using a single word or phrase."
   one user turn of the model's own template, no system prompt; the image padded to square with the mean colour.
3. Answer (`answer_questions`): greedy, batched, at most 100 new tokens, stopping at the template's stop tokens.
4. Score (extras.scoring, VLMEvalKit's rules with exact matching, no judge model): CircularEval for MMBench and
   CCBench (a question is right only if all its circular copies, index % 1e6 equal to it, are), accuracy for the
   other multiple-choice sets, POPE's F1 / accuracy / precision / recall, MME's perception and cognition scores,
   HallusionBench's aAcc / fAcc / qAcc, VQA accuracy (TextVQA) and exact match (GQA).

Outputs: each benchmark's work folder is DIR/<tsv name> (DIR: --out, default work_dirs/mmbench/<model>), or DIR
itself for --out with one --data. It holds
    partial-rank{R}.jsonl   answers as they are produced; a rerun of the same command skips what is there
    predictions.jsonl       every answered question: index, prediction (the raw answer), extracted, answer, hit, ...
    mmbench_result.xlsx     MMBench / CCBench: XTuner's table, the file to submit for a test split
    mmbench_result.json     MMBench / CCBench dev: {"Average": acc, "<category>": acc, ...} in [0, 1], XTuner's keys
and DIR holds <tsv name>_result.json (every metric, VLMEvalKit's keys; for multiple choice and GQA also the figures
of VLMEvalKit's own answer matching). The run ends with one summary table, a column per benchmark.

Deliberate differences from XTuner and VLMEvalKit (README):
* Answer letters are extracted by the documented rules of extras.mmbench.extract_choice, not by XTuner's first run
  of [A-D] anywhere ("Answer: B" -> "A" there) nor VLMEvalKit's last-four-words rule; options beyond D count.
* GQA's exact match compares normalised answers ("Yes." is "yes"), as TextVQA's does.
* Only empty cells and "nan"/"NaN" are missing: other strings pandas reads as NaN ("None", "NA", "N/A", "null")
  stay text, so an option reading "None" is shown, where XTuner silently drops it.
* A row whose image cannot be decoded is reported (index and reason) and scored wrong; the run goes on.
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import clip
import data
import extras.loader
import model as llava
from extras import mmbench as files
from extras import scoring
from extras.benchmarks import (CJK, INSTRUCTION_CN, INSTRUCTION_EN, KINDS, VQA_INSTRUCTION, Benchmark, decode_image,
                               read_benchmark)
from extras.fast_inference import GraphedDecodeStep, fuse_projections, unfusable_projections
from extras.mmbench import EvalError, index_key, question_record
from weights import write_json


def build_prompt(q, kind="mcq"):
    """The user text of a question (data.encode_prompt adds the template); multiple choice exactly as XTuner's."""
    if kind == "yorn":
        return "<image>\n" + q.question
    if kind == "vqa":
        return "<image>\n" + q.question + VQA_INSTRUCTION
    text = "<image>\n"
    if q.hint:
        text += q.hint + "\n"
    text += q.question + "\n"
    text += "".join(f"{letter}. {option}\n" for letter, option in q.options.items())
    return text + (INSTRUCTION_CN if CJK.search(text) else INSTRUCTION_EN)


# ----------------------------------------------------------------------------------------------------------------
# Answering: batched greedy generation, sharded over ranks, appended as it goes


def answer_questions(questions, generate_fn, out_dir, batch_size=8, rank=0, world_size=1, barrier=lambda: None,
                     kind="mcq", name="mmbench"):
    """Answer the questions not yet in out_dir's partial files, this rank's strided share of them, appending
    each batch's answers to partial-rank{rank}.jsonl. Returns {index key: partial record} of all ranks (every rank
    has finished when it returns).

    generate_fn(prompts: list[str], images: list[PIL.Image]) -> list[str] is the only contact with the model.
    """
    out_dir = Path(out_dir)
    done = files.done_predictions(out_dir)
    barrier()  # every rank has read the same done set before any rank appends, so the shards agree
    todo = [q for q in questions if index_key(q.index) not in done]
    mine = todo[rank::world_size]
    if rank == 0 and done:
        print(f"resuming: {len(done)} questions already answered in {out_dir}, {len(todo)} to go")
    t0 = time.perf_counter()
    bar_format = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
    with files.open_for_append(out_dir / f"partial-rank{rank}.jsonl") as f, \
            tqdm(total=len(mine), unit=" questions", bar_format=bar_format, disable=rank != 0 or not mine,
                 dynamic_ncols=True, desc=name if world_size == 1 else f"{name} (rank 0 of {world_size})") as bar:
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
                answers = generate_fn([build_prompt(q, kind) for q in good], images)
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
        # only answered with: q/k/v and gate/up each read as one matrix (an adapter keeps LoRA / NF4 layers apart)
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


def report(bench, records, out_dir, results_dir):
    """Score (dev split) and print the table; write predictions.jsonl (and for MMBench / CCBench the xlsx table)
    to out_dir and the result files to results_dir unless they are None. Returns the Scores (None on a test split)."""
    records = sorted(records, key=lambda r: r["index"])
    mmbench = bench.rules == "mmbench"
    bad = [r for r in records if r.get("error")]
    if bad:
        print(f"{len(bad)} row(s) had no usable image and are scored wrong:")
        for r in bad:
            print(f"  index {r['index']}: {r['error']}")
    if bench.no_image:
        print(f"note: {len(bench.no_image)} row(s) have no picture and are left out, as VLMEvalKit does (e.g. index "
              f"{bench.no_image[0]})")
    scores = scoring.score(bench, records) if bench.dev else None
    written = files.write_outputs(out_dir, records, submission=mmbench) if out_dir is not None else []
    if scores is None:
        where = f" in {Path(out_dir) / written[-1]}" if written else ""
        print(f"test split: {len(records)} answers{where}; " + ("submit it to the MMBench evaluation server" if
              mmbench else "the TSV holds no answers, so nothing is scored"))
        return None
    print(scoring.describe(bench, scores, f" {bench.name} ({bench.path}) "))
    if results_dir is not None:
        if mmbench and "Average" in scores.metrics:
            write_json(Path(out_dir) / "mmbench_result.json", scores.metrics)
            written.append("mmbench_result.json")
        write_json(Path(results_dir) / f"{bench.name}_result.json", scores.result)
        print(f"results: {', '.join(str(Path(out_dir) / w) for w in written)}, "
              f"{Path(results_dir) / f'{bench.name}_result.json'}")
    return scores


# ----------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", action="append", default=[],
                   help="benchmark TSV in VLMEvalKit's format (MMBench_DEV_EN.tsv, POPE.tsv, TextVQA_VAL.tsv, ...); "
                        "repeat it to run several in one go")
    p.add_argument("--kind", choices=KINDS, default=None,
                   help="mcq (multiple choice), yorn (yes / no) or vqa (open answers); default: told from the TSV's "
                        "name and columns")
    extras.loader.add_model_arguments(p)  # --model --llm --vision --template --bf16-base --lora-alpha
    p.add_argument("--out", default=None, help="results folder (default: work_dirs/mmbench/<model>)")
    p.add_argument("--score", metavar="PREDICTIONS", default=None,
                   help="score this predictions table (index, prediction columns; .jsonl, .tsv, .csv, .xlsx) without "
                        "a model; answers and categories from --data (without it, an MMBench table holding them). "
                        "Prints the table; writes files only with --out")
    p.add_argument("--limit", type=extras.loader.count, default=None, help="only the first N rows of each TSV")
    p.add_argument("--batch-size", type=extras.loader.count, default=8, help="questions per batched greedy generation")
    p.add_argument("--max-new-tokens", type=extras.loader.count, default=100)
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p.parse_args(argv)


def rescore(args):
    """--score: a predictions table, with answers and categories from --data or from the table itself."""
    if len(args.data) > 1:
        raise EvalError("--score takes one --data TSV (the benchmark the predictions answer)")
    rows = files.read_table(args.score)
    if args.data:
        bench = read_benchmark(args.data[0], args.kind, required=("index", "answer"), images=False)
    else:  # our predictions.jsonl or XTuner's xlsx of an MMBench-format run: the answers are in the table
        bench = Benchmark(Path(args.score), Path(args.score).stem, "mcq", "mmbench", [], [], [], dev=True)
    records = files.records_from_predictions(rows, args.score, bench.questions if args.data else None)
    scores = report(bench, records, args.out, args.out)  # files only with --out
    if scores is not None:
        print(scoring.summary_table(Path(args.score).name, {f"{bench.name} ({scores.result['headline']})":
                                                              scores.headline}))
    return scores


def main(argv=None, load_fn=load_generator):
    """Evaluate each --data in turn (or with --score, score a predictions file). load_fn(args, device, dtype) ->
    (generate_fn, cfg) is replaceable for tests; it is called only after the TSVs and the model path have been
    checked, with args.model set. Returns the Scores of each benchmark (None for a test split), a single one for
    one --data."""
    args = parse_args(argv)
    if args.score:
        return rescore(args)
    if not args.data:
        raise EvalError("pass --data TSV (a benchmark in VLMEvalKit's format), or --score PREDICTIONS to re-score")
    benches = [read_benchmark(path, args.kind) for path in args.data]  # every TSV checked before any model loads
    if len({b.name for b in benches}) < len(benches):
        raise EvalError(f"two --data TSVs have the same name ({', '.join(args.data)}): their result files would clash")
    for bench in benches:
        bench.questions = bench.questions[:args.limit]
    try:  # no --model: runs/latest, which train.py links to the newest model/ folder
        model_dir = extras.loader.model_path(args.model)
    except extras.loader.LoadError as e:
        raise EvalError(str(e)) from None
    args.model = str(model_dir)  # the folder checked and recorded in run.json is the one the loader reads

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
    dirs = [files.work_dir(args, b.path, model_dir, dtype_name, b.kind, rank) for b in benches]

    generate_fn, cfg = load_fn(args, device, dtype)
    if rank == 0:
        print(f"model {model_dir.resolve()} | template {cfg.get('template')} | no system prompt | image padded to "
              f"square (mean colour), {cfg.get('image_size')} px, {cfg.get('image_tokens')} positions | select layer "
              f"{cfg.get('select_layer', -2)} | {dtype_name} | greedy, <= {args.max_new_tokens} new tokens | "
              f"batch {args.batch_size} x {world_size} rank(s)")
    results, cells = [], {}
    for bench, (out_dir, results_dir) in zip(benches, dirs):
        if rank == 0:
            print(f"\n{bench.name}: {bench.path} ({len(bench.questions)} rows, {bench.kind}, {bench.rules} rules, "
                  f"{'dev' if bench.dev else 'test'} split) -> {out_dir}")
        done = answer_questions(bench.questions, generate_fn, out_dir, args.batch_size, rank, world_size, barrier,
                                bench.kind, bench.name)
        if rank != 0:
            continue
        missing = [q.index for q in bench.questions if index_key(q.index) not in done]
        if missing:
            print(f"warning: {len(missing)} questions have no answer (a rank stopped early?), e.g. index "
                  f"{missing[0]}; run the same command again to answer them")
        answers = {q.index: done[index_key(q.index)] for q in bench.questions if index_key(q.index) in done}
        records = [question_record(q, answers[q.index].get("prediction", ""), answers[q.index].get("error", ""))
                   for q in bench.questions if q.index in answers]
        results.append(report(bench, records, out_dir, results_dir))
        if results[-1] is not None:
            cells[f"{bench.name} ({results[-1].result['headline']})"] = results[-1].headline
    if cells:
        print("\n" + scoring.summary_table(files.model_tag(model_dir), cells))
    if world_size > 1:
        dist.destroy_process_group()
    return results[0] if len(results) == 1 else results or None


if __name__ == "__main__":
    try:
        main()
    except EvalError as e:
        sys.exit(f"eval_mmbench: {e}")
