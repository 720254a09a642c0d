"""The reproducible streams of a run: which images and which noise each optimiser step uses.

Both are functions of (seed, step) alone, so the loss of a step does not depend on the number of
processes or accumulation rounds, and a resumed run draws exactly what an uninterrupted one would:
- images: `InfiniteSampler` gives global position p = k*B + a*W*b + r*b + j to row j (of b =
  batch_gpu) of rank r (of W) in accumulation round a of step k; positions index a fresh seeded
  permutation of the dataset per epoch.
- noise and dropout: generators seeded by `step_seed(seed, k, stream)`.
"""

import numpy as np
import torch


def step_seed(seed, step, stream):
    """Distinct 63-bit seeds per (seed, step, stream) from numpy's SeedSequence hashing."""
    return int(np.random.SeedSequence([seed % (1 << 32), step, stream]).generate_state(2, np.uint32)
               .astype(np.uint64).dot([1 << 31, 1]))


class InfiniteSampler(torch.utils.data.Sampler):
    """Dataset indices for this rank, forever, starting at optimiser step `start_step` (see module doc)."""

    def __init__(self, size, batch, batch_gpu, rank=0, world_size=1, seed=0, start_step=0):
        assert batch % (batch_gpu * world_size) == 0
        self.size, self.batch, self.batch_gpu = size, batch, batch_gpu
        self.rank, self.world_size, self.seed, self.start_step = rank, world_size, seed, start_step
        self._perm_epoch, self._perm = None, None

    def _index(self, position):
        epoch, offset = divmod(position, self.size)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed % (1 << 32), epoch]).permutation(self.size)
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def __iter__(self):
        step = self.start_step
        rounds = self.batch // (self.batch_gpu * self.world_size)
        while True:
            for a in range(rounds):
                base = step * self.batch + (a * self.world_size + self.rank) * self.batch_gpu
                for j in range(self.batch_gpu):
                    yield self._index(base + j)
            step += 1

    def __len__(self):  # DataLoader asks; the stream is endless
        return 1 << 62
