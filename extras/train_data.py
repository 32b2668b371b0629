"""The data of a train.py run, wired from data.py's pieces: the dataset of the --data specs (every dropped record
listed in RUN/bad_records.jsonl), this rank's sampler, one epoch's batches, and the one-line data report.

    open_dataset     datasets.open_data, checked for the stage (text-only for sft), packed with --pack (packing.py)
    make_sampler     shuffled for pretrain, grouped by length for finetune and sft (XTuner's choice per stage)
    make_loader      this rank's micro-batches of one epoch, resumable mid-epoch
    optimizer_steps  those micro-batches grouped into optimizer steps
"""

import dataclasses
import itertools
import json
from functools import partial
from pathlib import Path

import numpy as np
import torch

import data
from extras import datasets
from extras.distributed import log, rank, world
from extras.packing import PackedDataset, collate_packed
from extras.samplers import LengthGroupedSampler, ShuffleSampler
from weights import atomic_write


def open_dataset(args, tok, cfg):
    """The tokenized dataset, bad and over-long records dropped, counted and listed in RUN/bad_records.jsonl (one
    JSON object per record: file, index, line, id and the reason); with --pack, rows of packed samples."""
    text_only = cfg["vision"] is None
    images = {} if text_only else dict(image_tokens=cfg["image_tokens"], image_size=cfg["image_size"],
                                       image_mode=cfg["image_mode"])
    try:
        ds = datasets.open_data(args.data, tok, cfg["template"], args.image_folder, max_length=args.max_length,
                                progress=rank() == 0, log=log, **images)
    except datasets.DataError as e:  # a --data that cannot be read at all: the file and the reason, no traceback
        raise SystemExit(f"--data: {e}") from None
    if rank() == 0:
        with atomic_write(Path(args.out) / "bad_records.jsonl") as f:
            f.write_text("".join(json.dumps(dataclasses.asdict(p), ensure_ascii=False) + "\n" for p in ds.problems()))
    if len(ds) == 0:
        raise SystemExit(f"no usable sample in {args.data} (see {args.out}/bad_records.jsonl; python "
                         f"tools/check_data.py check ...)")
    with_image = np.flatnonzero(np.asarray(ds.modality_lengths) > 0) if text_only else []
    if len(with_image):
        ids = [r for d in getattr(ds, "datasets", [ds]) for r in d.record_ids]  # a mix of several --data, or one
        raise SystemExit(f"--stage sft trains the LLM alone, but {len(with_image):,} of the {len(ds):,} samples in "
                         f"{args.data} have an image (the first: {ids[with_image[0]]}): remove those records "
                         f"(or their `image` key), or train them with --stage finetune --vision CLIP_DIR")
    if args.pack:
        ds = PackedDataset(ds, args.max_length, seed=args.seed)
        log(ds.summary())
    return ds


def make_sampler(args, ds):
    """This rank's sampler: shuffled for pretrain, grouped by length for finetune and sft (XTuner's choice per
    stage); packed rows are all about --max-length long, so grouping has nothing to do: shuffled."""
    if args.stage == "pretrain" or args.pack:
        sampler = ShuffleSampler(len(ds), seed=args.seed, world_size=world(), rank=rank())
    else:
        sampler = LengthGroupedSampler(ds.modality_lengths, args.micro_batch * args.accumulation, seed=args.seed,
                                       world_size=world(), rank=rank())
    if len(sampler) == 0:
        raise SystemExit(f"{len(ds)} samples cannot feed {world()} processes (fewer samples than processes)")
    return sampler


def collate_batch(items, image_tokens, packed=False):
    batch = collate_packed(items) if packed else data.collate(items, image_tokens=image_tokens)
    batch["positions"] = sum(len(x["input_ids"]) for x in items)  # real (unpadded) positions, for tok/s
    return batch


def make_loader(ds, sampler, args, cfg, epoch, start):
    """This rank's batches of one epoch, skipping the first `start` samples of its share without loading them."""
    sampler.set_epoch(epoch, start_index=start)
    return torch.utils.data.DataLoader(
        ds, batch_size=args.micro_batch, sampler=sampler, num_workers=args.num_workers,
        collate_fn=partial(collate_batch, image_tokens=cfg["image_tokens"], packed=args.pack),
        pin_memory=torch.cuda.is_available(),
        # its own generator: creating the iterator then draws no number from the global RNG, which dropout uses,
        # so a resumed run draws the same dropout masks as an uninterrupted one
        generator=torch.Generator().manual_seed(args.seed + epoch))


def optimizer_steps(batches, accumulation):
    """Group an epoch's micro-batches into optimizer steps of `accumulation` (the last one may be shorter). Data that
    stops the run while loading (every image of a long stretch unreadable) ends it with its one-line reason."""
    it = iter(batches)
    try:
        while micro := list(itertools.islice(it, accumulation)):
            yield micro
    except data.DataError as e:  # from a DataLoader worker, the message ends with the worker's "DataError: reason"
        reason = str(e).strip().splitlines()[-1].removeprefix(f"{data.DataError.__module__}.DataError: ")
        raise SystemExit(f"--data: {reason}") from None


def data_report(ds, sampler, out):
    """One line: records read, samples kept, records dropped (all listed in out/bad_records.jsonl), truncations."""
    st = ds.stats
    dropped = st["bad_record"] + st["too_long"] + st["no_supervised"]
    packed = isinstance(ds, PackedDataset)
    rows = f" in {len(ds):,} packed rows ({ds.fill:.0%} filled)" if packed else ""
    return (f"{st['records']:,} records -> {len(ds.ds if packed else ds):,} samples{rows} | dropped {dropped:,} "
            f"({st['bad_record']:,} bad, {st['too_long']:,} too long, {st['no_supervised']:,} with nothing supervised)"
            f" | truncated {st['truncated_at_turn'] + st['truncated_in_answer']:,} | left out by the sampler per epoch "
            f"{sampler.n_left_out} (samples % processes)"
            + (f" | all {dropped:,} dropped records, each with its reason: {out}/bad_records.jsonl" if dropped else ""))
