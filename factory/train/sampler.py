"""Which samples each rank sees at each optimizer step: exact, seeded, resumable, independent of the process count.

Every epoch is one seeded permutation of the dataset, wrapped around to a whole number of global batches (so every
optimizer step sees exactly `global_batch_size` samples and the last step of an epoch is not a runt). Global step
`s` of an epoch owns the slice `perm[s*G:(s+1)*G]`; inside it, micro-batch `a` of rank `r` takes the `m` samples at
offset `(a*world_size + r)*m`. The set of samples behind each optimizer step is therefore the same for 1 process
with 8 accumulation steps or 8 processes with 1, which is what makes loss curves comparable across launches, and
resuming at step `k` is just starting the iteration there (no sample skipped or seen twice).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, List

import torch


@dataclass(frozen=True)
class BatchPlan:
    num_samples: int
    micro_batch_size: int
    grad_accum: int
    world_size: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.world_size

    @property
    def steps_per_epoch(self) -> int:
        return -(-self.num_samples // self.global_batch_size)


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> List[int]:
    if not shuffle:
        return list(range(num_samples))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator).tolist()


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batch sampler for one rank: yields the index lists of its micro-batches, `grad_accum` per optimizer step,
    for optimizer steps `start_step .. total_steps-1` (steps counted across epochs)."""

    def __init__(self, plan: BatchPlan, rank: int, seed: int, total_steps: int, start_step: int = 0,
                 shuffle: bool = True):
        if plan.num_samples == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.plan, self.rank, self.seed, self.shuffle = plan, rank, seed, shuffle
        self.total_steps, self.start_step = total_steps, start_step
        self._order = (-1, [])  # (epoch, permutation) of the last epoch used; permutations of 665k ids cost ms

    def _epoch_order(self, epoch: int) -> List[int]:
        if self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.plan.num_samples, self.seed, epoch, self.shuffle))
        return self._order[1]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.plan.grad_accum

    def step_indices(self, step: int) -> List[List[int]]:
        """The micro-batches (lists of dataset indices) of this rank for one global optimizer step."""
        plan = self.plan
        epoch, step_in_epoch = divmod(step, plan.steps_per_epoch)
        order = self._epoch_order(epoch)
        start = step_in_epoch * plan.global_batch_size
        positions = range(start, start + plan.global_batch_size)
        window = [order[p % plan.num_samples] for p in positions]  # wrap around at the end of an epoch
        m = plan.micro_batch_size
        return [
            window[(a * plan.world_size + self.rank) * m:(a * plan.world_size + self.rank + 1) * m]
            for a in range(plan.grad_accum)
        ]

    def __iter__(self) -> Iterator[List[int]]:
        for step in range(self.start_step, self.total_steps):
            yield from self.step_indices(step)
