"""The training loss per noise level: sums over buckets of ln σ, the loss across noise levels that the EDM2
paper's learned uncertainty weighting levels out (Karras et al., CVPR 2024, Sec. 2), kept beside the mean loss
of every status line.

The buckets are fixed, so that runs with different P_mean / P_std compare: ln σ in (-inf, -3], (-3, -2], ...,
(2, 3], (3, inf). Every image of a step adds its mean per-element loss to its bucket's sum and one to its
bucket's count; the mean loss of the status line is the count-weighted mean of the bucket means.
"""

import torch

from edm2.plots import bucket_labels

EDGES = (-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0)  # upper edges of the ln σ buckets (the last one is open)
NUM_BUCKETS = len(EDGES) + 1


def bucket_names():
    """Labels of the buckets: 'ln_sigma<=-3', '-3<ln_sigma<=-2', ..., 'ln_sigma>3'."""
    return bucket_labels(EDGES)


def new_sums(device):
    """Zeroed sums [2 * NUM_BUCKETS] float64: per bucket, the loss sum, then the image count."""
    return torch.zeros(2 * NUM_BUCKETS, dtype=torch.float64, device=device)


_edges = {}  # (device, dtype) -> EDGES as a tensor, made once (no host-to-device copy per step)


def add(sums, image_losses, log_sigma):
    """Add the mean losses of a batch's images [N] (float64) at noise levels ln σ [N] to `sums`."""
    key = (log_sigma.device, log_sigma.dtype)
    if key not in _edges:
        _edges[key] = torch.tensor(EDGES, dtype=log_sigma.dtype, device=log_sigma.device)
    edges = _edges[key]
    bucket = torch.bucketize(log_sigma.reshape(-1), edges)  # bucket b holds EDGES[b-1] < ln σ <= EDGES[b]
    sums[:NUM_BUCKETS].index_add_(0, bucket, image_losses)
    sums[NUM_BUCKETS:].index_add_(0, bucket, torch.ones_like(image_losses))


def record(sums):
    """{'loss_sigma': bucket means (None where empty), 'loss_sigma_n': image counts, 'loss_sigma_edges': EDGES}
    for stats.jsonl (each line says what its buckets are)."""
    totals, counts = sums[:NUM_BUCKETS].tolist(), sums[NUM_BUCKETS:].tolist()
    return dict(loss_sigma=[t / n if n else None for t, n in zip(totals, counts)],
                loss_sigma_n=[int(n) for n in counts], loss_sigma_edges=list(EDGES))
