"""Feature statistics: mean and covariance accumulated in float64, summed over torchrun ranks.

mu = sum(f) / n,  Sigma = (sum(f f^T) - n mu mu^T) / (n - 1)   (unbiased, as numpy.cov).

Optionally the features themselves are kept (precision/recall and `ref --keep-features` need them):
each rank writes the rows of the items it processed into a zero-initialised [num_items, dim] array, and
the reduction sums those arrays, which leaves every row filled exactly once.
"""

import numpy as np
import torch

from edm2 import distributed


class FeatureStats:
    def __init__(self, dim, device='cpu', num_items=None, keep_features=False):
        self.dim = int(dim)
        self.device = torch.device(device)
        self.count = torch.zeros([1], dtype=torch.float64, device=self.device)
        self.sum = torch.zeros([self.dim], dtype=torch.float64, device=self.device)
        self.sum_outer = torch.zeros([self.dim, self.dim], dtype=torch.float64, device=self.device)
        self.features = None
        if keep_features:
            if num_items is None:
                raise ValueError('keep_features needs num_items')
            self.features = torch.zeros([int(num_items), self.dim], dtype=torch.float32, device=self.device)
        self._reduced = False

    def update(self, features: torch.Tensor, indices=None):
        """Add a batch of features [B, dim].

        When keeping features, `indices` [B] gives each row's slot in 0..num_items-1; a slot of -1 adds
        the row to mu / Sigma only.
        """
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f'expected features of shape [B, {self.dim}], got {list(features.shape)}')
        if self._reduced:
            raise RuntimeError('FeatureStats already reduced')
        f = features.to(self.device, torch.float64)
        self.count += f.shape[0]
        self.sum += f.sum(dim=0)
        self.sum_outer += f.T @ f
        if self.features is not None:
            if indices is None:
                raise ValueError('indices are required when keeping features')
            idx = torch.as_tensor(indices, dtype=torch.long).to(self.device)
            sel = idx >= 0
            self.features[idx[sel]] = features.to(self.device, torch.float32)[sel]

    def reduce(self):
        """Sum the accumulators over all ranks (once; a no-op for a single process)."""
        if not self._reduced:
            for t in (self.count, self.sum, self.sum_outer) + ((self.features,) if self.features is not None else ()):
                distributed.all_reduce_sum(t)
            self._reduced = True
        return self

    @property
    def num_items(self) -> int:
        return int(self.count[0].item())

    def mu_sigma(self):
        """(mu [dim], Sigma [dim, dim]) as numpy float64."""
        n = self.count[0].item()
        if n < 2:
            raise ValueError(f'feature statistics need at least 2 items, got {int(n)}')
        mu = self.sum / n
        sigma = torch.addr(self.sum_outer, mu, mu, beta=1 / (n - 1), alpha=-n / (n - 1))  # one pass, no temporaries
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def get_features(self) -> np.ndarray:
        if self.features is None:
            raise ValueError('features were not kept')
        return self.features.cpu().numpy()
