"""Packing text samples into rows of max_length (InternLM2 text SFT; XTuner's `pack_to_max_length=True`).

Several short samples share one row, so a batch holds few padding positions. Unlike XTuner, whose packed samples
attend to one another and are cut at row ends, a sample here is never cut, attends only to itself (the model gets
`segment_ids`, a block-diagonal causal mask) and sees positions 0, 1, ... as if it were alone (`position_ids`).

    ds = datasets.open_data(...)                      text-only samples
    packed = PackedDataset(ds, max_length, seed)  rows of whole samples, at most max_length positions each
    batch = collate_packed([packed[i], ...])      data.collate + position_ids and segment_ids (B, T)
"""

import numpy as np
import torch

import data
from extras import datasets
from tokenizer import IGNORE_INDEX


def pack_order(lengths, max_length, order):
    """Next-fit packing: walk `order`, closing the current pack when the next sample does not fit.
    -> [[sample indices of pack 0], [pack 1], ...], every pack at most max_length positions, order kept."""
    packs, current, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if n > max_length:
            raise data.DataError(f"sample {i} has {n} positions, more than the pack length {max_length}: build the "
                                 "dataset with the same max_length")
        if current and used + n > max_length:
            packs.append(current)
            current, used = [], 0
        current.append(int(i))
        used += n
    return packs + ([current] if current else [])


class PackedDataset(datasets.BaseDataset):
    """Text-only samples of `ds` (an LLaVADataset or LLaVAMix) packed into rows of at most max_length positions.

    The samples are shuffled once with `seed` before packing (XTuner's shuffle_before_pack), then packed in that
    order; a sampler then shuffles the packs each epoch. Item: {"id": [record ids], "input_ids" (L,), "labels" (L,),
    "position_ids" (L,) restarting at 0 for each sample, "segment_ids" (L,) 0, 0, ..., 1, 1, ... (the sample number
    in the pack), "pixel_values": None, "replaced": []}. Each sample's first label is IGNORE_INDEX: it would be
    predicted from the previous sample's last token (it is a prompt token anyway, so nothing supervised is lost).
    Its stats and problems are those of `ds`: the records read, and the ones dropped.
    """

    def __init__(self, ds, max_length, seed=0):
        self.ds, self.max_length, self.name = ds, max_length, ds.name
        with_images = np.flatnonzero(np.asarray(ds.modality_lengths) > 0)
        if len(with_images):
            raise data.DataError(f"packing is for text-only data, but {len(with_images):,} samples have images "
                                 f"(e.g. sample {with_images[0]}); train multimodal data without packing")
        lengths = np.asarray(ds.lengths)
        order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(seed)).tolist()
        self.packs = pack_order(lengths, max_length, order)
        used = np.asarray([lengths[p].sum() for p in self.packs], dtype=np.int64)
        self.modality_lengths = -used  # negative = text-only, as LLaVADataset's (for LengthGroupedSampler)
        self.fill = float(used.sum()) / max(len(self.packs) * max_length, 1)  # real positions / row positions

    def __len__(self):
        return len(self.packs)

    @property
    def stats(self):
        return self.ds.stats

    def problems(self):
        return self.ds.problems()

    def summary(self):
        return (f"packed {len(self.ds):,} samples into {len(self):,} rows of at most {self.max_length} positions "
                f"({self.fill:.0%} filled)\n" + super().summary())

    def __getitem__(self, i):
        items = [self.ds[j] for j in self.packs[i]]  # text-only: no image to load, so nothing is ever replaced
        labels = [x["labels"].clone() for x in items]
        for y in labels:
            y[0] = IGNORE_INDEX
        return {"id": [x["id"] for x in items], "input_ids": torch.cat([x["input_ids"] for x in items]),
                "labels": torch.cat(labels),
                "position_ids": torch.cat([torch.arange(len(x["input_ids"])) for x in items]),
                "segment_ids": torch.cat([torch.full((len(x["input_ids"]),), k) for k, x in enumerate(items)]),
                "pixel_values": None, "replaced": []}


def collate_packed(batch, pad_id=0):
    """`data.collate` for PackedDataset items, plus "position_ids" and "segment_ids" (B, T) long for the model;
    padding gets position 0 and segment -1 (a block of its own, which no real token attends to)."""
    out = data.collate(batch, pad_id)
    T = out["input_ids"].shape[1]
    out["position_ids"] = torch.zeros(len(batch), T, dtype=torch.long)
    out["segment_ids"] = torch.full((len(batch), T), -1, dtype=torch.long)
    for b, x in enumerate(batch):
        t = len(x["input_ids"])
        out["position_ids"][b, :t], out["segment_ids"][b, :t] = x["position_ids"], x["segment_ids"]
    out["ids"] = [i for x in batch for i in x["id"]]
    return out
