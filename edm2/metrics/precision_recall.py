"""Improved precision and recall (Kynkäänniemi et al., NeurIPS 2019).

Each feature of a set gets a ball whose radius is the distance to its k-th nearest neighbour within
the set (k = 3, the point itself not counted). Precision = share of generated features inside at least
one real ball; recall = share of real features inside at least one generated ball.

Distances are computed in blocks of rows so that at most `max_block` distances exist at a time: the
50k x 50k matrix of the paper protocol never sits in memory.
"""

import torch


def _sq_dists(a, b):
    # ||a||^2 + ||b||^2 - 2 a.b, clamped at 0 against rounding.
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * (a @ b.T)).clamp_min_(0)


def _block_rows(num_cols, max_block):
    return max(1, int(max_block) // max(int(num_cols), 1))


def knn_radii(x: torch.Tensor, k: int = 3, max_block: int = 1 << 26) -> torch.Tensor:
    """Squared distance of every row of x to its k-th nearest other row."""
    n = x.shape[0]
    if n <= k:
        raise ValueError(f'need more than k={k} features, got {n}')
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    rows = _block_rows(n, max_block)
    for start in range(0, n, rows):
        d = _sq_dists(x[start:start + rows], x)
        # The (k+1)-th smallest includes the point itself at distance 0.
        out[start:start + rows] = d.kthvalue(k + 1, dim=1).values
    return out


def coverage_fraction(queries: torch.Tensor, centers: torch.Tensor, radii_sq: torch.Tensor,
                      max_block: int = 1 << 26) -> float:
    """Share of `queries` inside at least one ball (centers, squared radii)."""
    inside = 0
    rows = _block_rows(centers.shape[0], max_block)
    for start in range(0, queries.shape[0], rows):
        d = _sq_dists(queries[start:start + rows], centers)
        inside += int((d <= radii_sq[None, :]).any(dim=1).sum().item())
    return inside / queries.shape[0]


def precision_recall(real, gen, k: int = 3, device=None, dtype=torch.float32, max_block: int = 1 << 26):
    """(precision, recall) of generated features `gen` [N, D] against real features `real` [M, D]."""
    real = torch.as_tensor(real).to(device=device, dtype=dtype)
    gen = torch.as_tensor(gen).to(device=device, dtype=dtype)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f'feature sets do not match: {list(real.shape)} vs {list(gen.shape)}')
    real_radii = knn_radii(real, k, max_block)
    gen_radii = knn_radii(gen, k, max_block)
    precision = coverage_fraction(gen, real, real_radii, max_block)
    recall = coverage_fraction(real, gen, gen_radii, max_block)
    return precision, recall
