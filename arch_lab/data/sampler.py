"""A shuffling sampler whose order depends only on (seed, epoch), and which can skip the batches a resumed
run already consumed, so resuming from a mid-epoch checkpoint replays exactly the same data.

Data parallel (DDP/FSDP over W processes): every rank draws the same permutation and rank r takes its positions
r, r+W, r+2W, ... (the permutation is first cut to a multiple of W, so all ranks get equally many). With a
per-rank batch of b, the step-k batches of the W ranks together are positions [kWb, (k+1)Wb) of the permutation:
the batch that one process with batch size W*b draws at step k. So `data.batch_size` is per device, and DDP on
W devices at batch b sees the same global batches as one device at batch W*b (training loaders drop the last
partial batch of an epoch, which keeps the two in step across epochs too).
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.length, self.seed = length, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        # Set by the training module on resume; consumed by the next __iter__. Counted in positions of the
        # global permutation (all ranks' samples), so it is the same number on every rank.
        self.skip_samples = 0
        # Set on resume too: the epoch of the data minus the Trainer's epoch. A run stopped mid-epoch (Ctrl-C,
        # trainer.max_time) saves a checkpoint whose epoch Lightning counts as finished, so the resumed Trainer
        # starts the next epoch while the data is still in the stopped one.
        self.epoch_offset = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch + self.epoch_offset

    def __len__(self) -> int:  # per rank
        return self.length // self.num_replicas

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        used = len(self) * self.num_replicas
        order = torch.randperm(self.length, generator=gen)[:used][self.skip_samples:]
        self.skip_samples = 0
        return iter(order[self.rank::self.num_replicas].tolist())
