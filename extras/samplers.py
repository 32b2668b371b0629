"""Samplers: one epoch's order, each rank's share, resumable mid-epoch.

ShuffleSampler is a plain seeded shuffle (pretraining); LengthGroupedSampler is XTuner's (and LLaVA's) modality-
and length-grouped order for finetuning: samples of similar length in a batch, images and text-only apart.
Samplers never repeat samples to round up (the last `n % world_size` of an epoch are left out, reported as
`n_left_out`) and resume mid-epoch by skipping indices.
"""

import numpy as np
import torch

class EpochSampler(torch.utils.data.Sampler):
    """Base: a global order per epoch (seeded by seed + epoch), rank r takes order[r::world_size].

    No round-up: the last n % world_size entries of the order are left out (so every rank runs the same number of
    steps; `n_left_out` reports them). `start_index` skips this rank's first k samples without loading them, so a
    resumed run continues mid-epoch: set_epoch(epoch, start_index=micro_steps_done * micro_batch).
    """

    def __init__(self, n, seed=0, world_size=1, rank=0):
        self.n, self.seed, self.world_size, self.rank = n, seed, world_size, rank
        self.num_samples = n // world_size  # per rank, per epoch
        self.n_left_out = n % world_size
        self.epoch, self.start_index = 0, 0

    def set_epoch(self, epoch, start_index=0):
        self.epoch, self.start_index = epoch, start_index

    def generator(self):
        return torch.Generator().manual_seed(self.seed + self.epoch)

    def order(self):
        raise NotImplementedError

    def __iter__(self):
        order = self.order()[: self.num_samples * self.world_size]
        return iter(order[self.rank :: self.world_size][self.start_index :])

    def __len__(self):
        return max(self.num_samples - self.start_index, 0)


class ShuffleSampler(EpochSampler):
    """Pretrain: a seeded random permutation per epoch (mmengine's DefaultSampler, without its round-up)."""

    def order(self):
        return torch.randperm(self.n, generator=self.generator()).tolist()


def length_grouped_order(lengths, group_size, generator):
    """XTuner's get_length_grouped_indices. `lengths` are signed: > 0 multimodal, < 0 text-only.

    Each modality: a random permutation cut into megabatches of group_size, each sorted by length, longest first.
    With both modalities, the two last (partial) megabatches merge into one final megabatch and the others are
    shuffled; then the longest sample is swapped to the very front, so an out-of-memory shows at step 1.
    Draws randperm(n_multimodal), randperm(n_text), randperm(n_megabatches) from `generator`, in that order.
    (XTuner sorts an all-text-only dataset by its negative lengths, shortest first; we sort by |length|.)
    """
    size = [abs(int(x)) for x in lengths]

    def megabatches(indices):
        perm = torch.randperm(len(indices), generator=generator).tolist()
        shuffled = [indices[p] for p in perm]
        chunks = [shuffled[a : a + group_size] for a in range(0, len(shuffled), group_size)]
        return [sorted(c, key=lambda i: size[i], reverse=True) for c in chunks]  # stable: ties keep their order

    multimodal = [i for i, x in enumerate(lengths) if x > 0]
    text_only = [i for i, x in enumerate(lengths) if x < 0]
    if not multimodal or not text_only:
        batches = megabatches(multimodal or text_only)
    else:
        mm, text = megabatches(multimodal), megabatches(text_only)
        rest = mm[:-1] + text[:-1]
        batches = [rest[p] for p in torch.randperm(len(rest), generator=generator).tolist()]
        batches.append(sorted(mm[-1] + text[-1], key=lambda i: size[i], reverse=True))
    if batches:
        k = max(range(len(batches)), key=lambda b: (size[batches[b][0]], -b))  # the first of the longest
        batches[0][0], batches[k][0] = batches[k][0], batches[0][0]
    return [i for b in batches for i in b]


class LengthGroupedSampler(EpochSampler):
    """Finetune: XTuner's LengthGroupedSampler. Lengths count image positions (XTuner counts an image as 1 token).

    per_device_batch_size = micro batch x gradient accumulation (what one rank consumes per optimizer step);
    megabatch = min(n // (total_batch * 4), 50) (at least 1) x total_batch, total_batch = per_device x world_size.
    Rank r takes order[r::world_size], so each rank's consecutive micro-batches have similar lengths.
    """

    def __init__(self, modality_lengths, per_device_batch_size, seed=0, world_size=1, rank=0, mega_batch_mult=None):
        super().__init__(len(modality_lengths), seed, world_size, rank)
        self.modality_lengths = np.asarray(modality_lengths)
        total_batch = per_device_batch_size * world_size
        if mega_batch_mult is None:
            mega_batch_mult = max(min(self.n // (total_batch * 4), 50), 1)  # 50, or 4 megabatches on tiny data
        self.group_size = mega_batch_mult * total_batch

    def order(self):
        return length_grouped_order(self.modality_lengths.tolist(), self.group_size, self.generator())
