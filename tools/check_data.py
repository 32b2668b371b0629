"""Check LLaVA training data up front, or show samples as the model sees them.

    python tools/check_data.py check DATA... [--image-folder DIR] [--tokenizer FOLDER] [--template T]
                                             [--max-length N] [--image-tokens N] [--workers N]
    python tools/check_data.py show  DATA... --tokenizer FOLDER [--n N] [--jsonl]

`check` reads every record and opens every image of the data (DATA: `--data` specs as train.py takes them) and
prints one line per bad one, `file:line: record ID: [image PATH:] reason`, then a count; with --tokenizer it also
applies the length policy. It exits 1 if anything is bad. `show` prints samples with their supervised text marked
(green on a terminal, ⟦...⟧ otherwise), or with --jsonl one {"id", "input_ids", "labels"} per sample, each image as
a single -200: diffable against XTuner's own encoding.
"""

import argparse
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

# run as a script, Python puts tools/ on sys.path, not the project root that holds the modules imported below
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import clip  # noqa: E402
import data  # noqa: E402
from extras import datasets  # noqa: E402
from extras.tokenizer_files import load_tokenizer  # noqa: E402
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX  # noqa: E402


def _check_image(folder, path):
    try:
        img = clip.load_image(folder / path)
        clip.preprocess(img, 32, pad_to_square=True)  # decodes every pixel; a tiny size keeps it cheap
        return None
    except (clip.ImageError, OSError, ValueError) as e:
        return str(e) or type(e).__name__


def check(specs, image_folder=None, tok=None, template="llama3_chat", max_length=2048, image_tokens=576,
          workers=8, out=None):
    """Every bad record and image of the data, printed one per line. Returns the list of data.Problems."""
    problems, stats = [], Counter()
    for path, folder in [s for spec in specs for s in datasets.parse_data_spec(spec, image_folder)]:
        folder = folder or path.parent
        jobs = []  # (sample, image path) to open
        try:
            samples = list(tqdm(datasets.iter_samples(path), desc=f"reading {path.name}", unit=" records", mininterval=2,
                                disable=path.stat().st_size < 20_000_000 if path.is_file() else True))
        except data.DataError as e:  # the whole file is unreadable: one problem (record index -1), next file
            problems.append(data.Problem(str(path), -1, 0, "-", str(e)))
            continue
        for s in samples:
            stats["records"] += 1
            if isinstance(s, data.Problem):
                problems.append(s)
                continue
            if tok is not None:
                _, _, status, reason = data.encode_sample(tok, template, s, max_length, image_tokens)
                stats[status] += 1
                if reason:
                    problems.append(data.Problem(str(path), s.index, s.line, s.id, reason))
                    continue
            jobs += [(s, p) for p in s.images]
        stats["images"] += len(jobs)
        with ThreadPoolExecutor(max(workers, 1)) as pool:  # PIL decodes outside the GIL
            errors = pool.map(lambda job: _check_image(folder, job[1]), jobs, chunksize=64)
            for (s, image), err in tqdm(zip(jobs, errors), total=len(jobs), desc=f"opening images of {path.name}",
                                        unit=" images", mininterval=2, disable=len(jobs) < 2000):
                if err is not None:
                    problems.append(data.Problem(str(path), s.index, s.line, s.id, err, image=str(folder / image)))
    out = out or sys.stdout
    problems.sort(key=lambda p: (p.file, p.line))
    for p in problems:
        print(p, file=out)
    truncated = stats["truncated_at_turn"] + stats["truncated_in_answer"]
    print(f"checked {stats['records']:,} records and {stats['images']:,} images: {len(problems):,} bad"
          + (f", {truncated:,} would be truncated to {max_length} positions" if tok is not None else ""), file=out)
    return problems


def _show(ds, i, tok, color):
    ids, labels = ds.compact(i)
    runs, start = [], 0
    for k in range(1, len(ids) + 1):  # split into runs of (image | supervised text | prompt text)
        if k == len(ids) or ids[k] == IMAGE_TOKEN_INDEX or ids[k - 1] == IMAGE_TOKEN_INDEX or \
                (labels[k] != IGNORE_INDEX) != (labels[k - 1] != IGNORE_INDEX):
            runs.append((start, k))
            start = k
    text = ""
    for a, b in runs:
        if ids[a] == IMAGE_TOKEN_INDEX:
            text += f"<image x{ds.image_tokens}>"
            continue
        piece = tok.decode(ids[a:b].tolist(), skip_special=False)
        if labels[a] != IGNORE_INDEX:
            piece = f"\x1b[32m{piece}\x1b[0m" if color else f"⟦{piece}⟧"
        text += piece
    length = abs(int(ds.modality_lengths[i]))
    return f"--- {ds.record_ids[i]} ({ds.records_path}:{ds.lines[i]}, {length} positions)\n{text}"


def main(argv=None):
    p = argparse.ArgumentParser(description="Check LLaVA data, or show samples as the model sees them.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("check", "show"):
        q = sub.add_parser(name)
        q.add_argument("data", nargs="+", help="RECORDS.json[:IMAGE_FOLDER], RECORDS.jsonl[:IMAGE_FOLDER], a mix file")
        q.add_argument("--image-folder", help="image folder of sources that name none (default: the records' folder)")
        q.add_argument("--tokenizer", required=name == "show", help="folder with the tokenizer (check: length checks)")
        q.add_argument("--template", default="llama3_chat", choices=sorted(data.TEMPLATES))
        q.add_argument("--max-length", type=int, default=2048, help="positions, images included")
        q.add_argument("--image-tokens", type=int, default=576, help="positions per image (576 for ViT-L/14-336)")
    sub.choices["check"].add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    sub.choices["show"].add_argument("--n", type=int, default=None, help="how many (default 3; all with --jsonl)")
    sub.choices["show"].add_argument("--jsonl", action="store_true",
                                     help='one {"id", "input_ids", "labels"} per sample, each image as one -200')
    args = p.parse_args(argv)
    tok = load_tokenizer(args.tokenizer) if args.tokenizer else None
    if args.command == "check":
        problems = check(args.data, args.image_folder, tok, args.template, args.max_length, args.image_tokens,
                         args.workers)
        return 1 if problems else 0
    try:
        ds = datasets.open_data(args.data, tok, args.template, args.image_folder, image_tokens=args.image_tokens,
                                max_length=args.max_length)
    except data.DataError as e:  # the file (or its image folder) cannot be read at all: say which, no traceback
        raise SystemExit(f"check_data.py show: {e}") from None
    n = len(ds) if args.n is None and args.jsonl else min(args.n or 3, len(ds))
    parts = ds.datasets if isinstance(ds, datasets.LLaVAMix) else [ds]
    shown = 0
    for d in parts:
        for i in range(len(d)):
            if shown == n:
                return 0
            if args.jsonl:
                ids, labels = d.compact(i)
                print(json.dumps({"id": d.record_ids[i], "input_ids": ids.tolist(), "labels": labels.tolist()}))
            else:
                print(_show(d, i, tok, sys.stdout.isatty()))
            shown += 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
