"""A shuffling sampler whose order depends only on (seed, epoch), and which can skip the batches a resumed
run already consumed, so resuming from a mid-epoch checkpoint replays exactly the same data."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableShuffleSampler(Sampler[int]):
    def __init__(self, length: int, seed: int):
        self.length, self.seed = length, seed
        self.epoch = 0
        self.skip_samples = 0  # set by the training module on resume; consumed by the next __iter__

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.length, generator=gen)[self.skip_samples:]
        self.skip_samples = 0
        return iter(order.tolist())
