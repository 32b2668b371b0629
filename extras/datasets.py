"""Datasets: records files -> tokenized samples, with their images loaded per item.

data.py turns one record into ids and labels; here those are made for a whole records file (or a mix of them, XTuner's
InternVL recipe), stored compactly, and served to train.py's DataLoader. A record that cannot be used is dropped and
listed (`problems()`, written by train.py to the run folder); a sample whose image fails to load at training time is
replaced by another sample drawn at random, so no neighbour is trained twice in its place.

Data specs (`--data`, repeatable; sources are concatenated in order, as XTuner's InternVL-SFT `ConcatDataset`):
`records.json[:IMAGE_FOLDER]` (a list of records), `records.jsonl[:IMAGE_FOLDER]`, or a mix file holding
`{"datasets": [{"path": ..., "image_folder": ...}]}` (paths relative to it). A source without an image folder uses
`--image-folder`, else its own directory.
"""

import json
import re
import sys
import warnings
from array import array
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import clip
from data import DataError, DataWarning, Problem, RecordError, encode_sample, get_template, parse_record
from tokenizer import IGNORE_INDEX, IMAGE_TOKEN_INDEX


# ----------------------------------------------------------------------------------------------------------------
# Records files

_WS = re.compile(r"[ \t\n\r]*")


def _json_list(text, path):
    # raw_decode one element at a time (instead of json.loads) so every record knows its line number
    decoder, pos = json.JSONDecoder(), _WS.match(text, 0).end()
    if text[pos : pos + 1] != "[":
        raise DataError(f"{path}: a .json records file must hold a list of records (use .jsonl for one per line)")
    pos = _WS.match(text, pos + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos
    if text[pos : pos + 1] == "]":
        return
    while True:
        line, counted = line + text.count("\n", counted, pos), pos
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        yield line, obj
        pos = _WS.match(text, pos).end()
        if text[pos : pos + 1] == "]":
            return
        if text[pos : pos + 1] != ",":
            raise DataError(f"{path}: expected ',' or ']' at line {1 + text.count(chr(10), 0, pos)}")
        pos = _WS.match(text, pos + 1).end()


def _read_records(path):
    """Yield (line, record, error) for every record of a .json list or a .jsonl file; error is a string or None.
    A bad .jsonl line is one bad record; a .json list that does not parse is a DataError (it cannot be resynced)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"no records file at {path}")
    with open(path, encoding="utf-8") as f:
        if path.suffix != ".jsonl":
            yield from ((line, record, None) for line, record in _json_list(f.read(), path))
            return
        for line, text in enumerate(f, 1):
            if text.strip():
                try:
                    yield line, json.loads(text), None
                except json.JSONDecodeError as e:
                    yield line, None, f"invalid JSON: {e.msg} (column {e.colno})"


def iter_samples(path):
    """Yield a Sample for every good record of a file and a Problem for every bad one."""
    for index, (line, record, error) in enumerate(_read_records(path)):
        rid = str(record.get("id")) if isinstance(record, dict) and record.get("id") is not None else "?"
        try:
            if error is not None:
                raise RecordError(error)
            item = parse_record(record, line, index)
        except RecordError as e:
            item = Problem(str(path), index, line, rid, e.reason)
        yield item


# ----------------------------------------------------------------------------------------------------------------
# Datasets


class BaseDataset(torch.utils.data.Dataset):
    """What train.py reads from a dataset besides its items; every dataset of the project has it (LLaVADataset,
    LLaVAMix, extras.packing.PackedDataset, bench/train_synthetic.py's SyntheticData):

        modality_lengths  (N,) int array: positions of each item, images counted; negative = text-only (XTuner's sign)
        lengths           their absolute values
        stats             a Counter of the records read: kept, truncated_at_turn, truncated_in_answer (became
                          samples) and bad_record, too_long, no_supervised (dropped)
        problems()        every dropped record, a list of Problem (file, record index, line, id, reason)
        summary()         the log's report of all that: one line, then the first 5 problems
    """

    name = "data"  # how summary() names the data

    @property
    def lengths(self):
        return np.abs(self.modality_lengths)

    def problems(self):
        return []

    def summary(self):
        st, problems = self.stats, self.problems()
        dropped = st["bad_record"] + st["too_long"] + st["no_supervised"]
        text = (f"{self.name}: {st['records']:,} records -> {st['records'] - dropped:,} samples | dropped {dropped:,}"
                f" ({st['bad_record']:,} bad, {st['too_long']:,} too long, {st['no_supervised']:,} with nothing"
                f" supervised) | truncated {st['truncated_at_turn'] + st['truncated_in_answer']:,}"
                f" ({st['truncated_at_turn']:,} at a turn end, {st['truncated_in_answer']:,} inside an answer)")
        text += "".join(f"\n  {p}" for p in problems[:5])
        if len(problems) > 5:
            text += f"\n  ... and {len(problems) - 5:,} more ({len(problems):,} bad records in all)"
        return text


class LLaVADataset(BaseDataset):
    """One records file + its image folder, tokenized up front, images loaded per item.

    Item: {"id", "input_ids" (T,) long, "labels" (T,) long, "pixel_values" (n_images, 3, S, S) float32 or None
    (text-only: no dummy image), "replaced": [records skipped because their image failed]}.
    Token ids are kept compactly (one IMAGE_TOKEN_INDEX per image, numpy arrays), so the dataset is small, shares
    well with forked DataLoader workers and pickles (it keeps no tokenizer). `seed` picks the replacements of
    samples whose image fails to load.
    """

    def __init__(self, records_path, image_folder, tok, template="llama3_chat", image_tokens=576, image_size=336,
                 image_mode="pad", max_length=2048, seed=0, progress=True,
                 log=partial(print, file=sys.stderr)):
        if image_mode not in ("pad", "crop"):
            raise ValueError(f"image_mode must be 'pad' (finetune) or 'crop' (pretrain), not {image_mode!r}")
        self.records_path = Path(records_path)
        if not self.records_path.is_file():
            raise DataError(f"no records file at {self.records_path} (a --data spec is RECORDS.json[:IMAGE_FOLDER])")
        self.name = f"data {self.records_path}"
        self.image_folder = Path(image_folder) if image_folder else self.records_path.parent
        if not self.image_folder.is_dir():  # a mistyped folder would otherwise show only as every image failing
            raise DataError(f"image folder {self.image_folder} (for {self.records_path}): no such folder")
        self.image_tokens, self.image_size, self.image_mode, self.seed = image_tokens, image_size, image_mode, seed
        template = get_template(template)
        ids, supervised, offsets = array("i"), array("b"), [0]
        self.record_ids, self.lines, self.image_paths = [], [], []
        self.stats, self.bad = Counter(), []
        big = progress and self.records_path.stat().st_size > 20_000_000
        for s in tqdm(iter_samples(self.records_path), desc=f"tokenizing {self.records_path.name}",
                      unit=" records", disable=not big, mininterval=2):
            self.stats["records"] += 1
            if isinstance(s, Problem):
                self.stats["bad_record"] += 1
                self.bad.append(s)
                continue
            sample_ids, labels, status, reason = encode_sample(tok, template, s, max_length, image_tokens)
            self.stats[status] += 1
            if reason:
                self.bad.append(Problem(str(self.records_path), s.index, s.line, s.id, reason))
                continue
            ids.extend(sample_ids)
            supervised.extend(label != IGNORE_INDEX for label in labels)
            offsets.append(len(ids))
            n_images = sample_ids.count(IMAGE_TOKEN_INDEX)  # a turn cut off takes its images with it
            self.record_ids.append(s.id)
            self.lines.append(s.line)
            self.image_paths.append(tuple(s.images[:n_images]))
        self.ids = np.frombuffer(ids, dtype=np.int32) if ids else np.zeros(0, np.int32)
        self.supervised = np.frombuffer(supervised, dtype=np.int8).astype(bool) if ids else np.zeros(0, bool)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        n_images = np.asarray([len(p) for p in self.image_paths], dtype=np.int64)
        lengths = np.diff(self.offsets) + n_images * (image_tokens - 1)  # image positions count
        self.modality_lengths = np.where(n_images > 0, lengths, -lengths)  # XTuner's sign: negative = text-only
        self.unloadable = set()  # samples whose image failed to load (in this process)
        log(self.summary())

    def __len__(self):
        return len(self.offsets) - 1

    def problems(self):
        return list(self.bad)

    def compact(self, i):
        """(ids, labels) of sample i as int64 numpy arrays, one IMAGE_TOKEN_INDEX per image."""
        a, b = self.offsets[i], self.offsets[i + 1]
        ids = self.ids[a:b].astype(np.int64)
        return ids, np.where(self.supervised[a:b], ids, IGNORE_INDEX)

    def tokens(self, i):
        """(input_ids, labels) of sample i as (T,) long tensors, each image expanded to image_tokens positions."""
        ids, labels = self.compact(i)
        repeats = np.where(ids == IMAGE_TOKEN_INDEX, self.image_tokens, 1)
        return torch.from_numpy(np.repeat(ids, repeats)), torch.from_numpy(np.repeat(labels, repeats))

    def load_images(self, i):
        """(n_images, 3, S, S) float32 for sample i, or None; raises clip.ImageError / OSError on a bad file."""
        if not self.image_paths[i]:
            return None
        pad = self.image_mode == "pad"
        images = [clip.load_image(self.image_folder / p) for p in self.image_paths[i]]
        return torch.stack([clip.preprocess(img, self.image_size, pad_to_square=pad) for img in images])

    def replacement(self, rng):
        """A sample drawn at random to train instead of one whose image failed. Draws known to fail are skipped,
        and a draw not yet known to fail fails when tried: so the pick depends only on (seed, failed index), never
        on what this process has seen (DataLoader workers and a resumed run pick the same), and a run of bad
        records does not train one neighbour several times, as taking the next sample would."""
        while len(self.unloadable) < len(self):
            j = int(rng.integers(len(self)))
            if j not in self.unloadable:
                return j
        return None

    def __getitem__(self, i):
        j, replaced = i, []
        rng = np.random.default_rng([self.seed, i])
        # 1000 failures in a row is not bad data but a wrong image folder: that one is an error worth stopping for
        while j is not None and len(replaced) < min(len(self), 1000):
            try:
                pixel_values = self.load_images(j)
            except (clip.ImageError, OSError, ValueError) as e:
                where = f"{self.records_path}:{self.lines[j]}"
                replaced.append({"id": self.record_ids[j], "file": where, "reason": str(e)})
                self.unloadable.add(j)
                warnings.warn(f"record {self.record_ids[j]} ({where}): cannot load its image: {e}; training a sample "
                              "drawn at random instead (python tools/check_data.py check lists every bad image)",
                              DataWarning)
                j = self.replacement(rng)
                continue
            input_ids, labels = self.tokens(j)
            return {"id": self.record_ids[j], "input_ids": input_ids, "labels": labels,
                    "pixel_values": pixel_values, "replaced": replaced}
        raise DataError(f"{len(replaced)} samples from sample {i} of {self.records_path} could not load their image "
                        f"(last: {replaced[-1]['reason']}); is the image folder {self.image_folder} right?")


class LLaVAMix(torch.utils.data.ConcatDataset, BaseDataset):
    """Several LLaVADatasets one after the other (XTuner's InternVL-SFT recipe): every sample once per epoch."""

    name = "data mix"

    @property
    def modality_lengths(self):
        return np.concatenate([d.modality_lengths for d in self.datasets])

    @property
    def stats(self):
        return sum((d.stats for d in self.datasets), Counter())

    def problems(self):
        return [p for d in self.datasets for p in d.problems()]


def parse_data_spec(spec, image_folder=None):
    """`records.json[:FOLDER]`, `records.jsonl[:FOLDER]` or a mix file -> [(records_path, image_folder), ...]."""
    m = re.fullmatch(r"(.+?\.jsonl?)(?::(.+))?", spec)
    if not m:
        raise DataError(f"data spec {spec!r}: expected RECORDS.json[:IMAGE_FOLDER] or RECORDS.jsonl[:IMAGE_FOLDER]")
    path, folder = Path(m.group(1)), m.group(2) or image_folder
    if path.suffix == ".json" and path.is_file():
        with open(path, encoding="utf-8") as f:
            head = f.read(4096).lstrip()
        if head.startswith("{"):  # a mix file, not a list of records
            if m.group(2):
                raise DataError(f"data spec {spec!r}: a mix file lists its own image folders")
            mix = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(mix, dict) or not isinstance(mix.get("datasets"), list):
                raise DataError(f"{path}: a mix file holds {{\"datasets\": [{{\"path\", \"image_folder\"}}, ...]}}")
            root = path.parent
            return [(root / d["path"], root / d["image_folder"] if d.get("image_folder") else None)
                    for d in mix["datasets"]]
    return [(path, Path(folder) if folder else None)]


def open_data(specs, tok, template="llama3_chat", image_folder=None, **kwargs):
    """One dataset (LLaVADataset) or a concatenation (LLaVAMix) from `--data` specs; kwargs go to LLaVADataset."""
    specs = [specs] if isinstance(specs, str) else specs
    sources = [s for spec in specs for s in parse_data_spec(spec, image_folder)]
    datasets = [LLaVADataset(path, folder, tok, template, **kwargs) for path, folder in sources]
    return datasets[0] if len(datasets) == 1 else LLaVAMix(datasets)
