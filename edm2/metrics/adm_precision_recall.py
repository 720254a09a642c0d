"""Improved precision and recall as the ADM evaluator computes them (Kynkäänniemi et al., "Improved precision
and recall metric for assessing generative models", NeurIPS 2019; protocol of Dhariwal & Nichol, NeurIPS 2021).

NOTICE: this module follows the protocol of guided-diffusion's `evaluations/evaluator.py` (MIT licence,
Copyright (c) 2021 OpenAI): the code is written here, the choices below are the evaluator's.

Every feature (Inception pool features) gets a ball whose squared radius is the squared Euclidean distance
to its k-th nearest neighbour in its own set (k = 3, the point itself not counted). Precision = share of
samples inside at least one reference ball (d(x, r)^2 <= radius(r)^2); recall = share of reference
features inside at least one sample ball. Unlike `precision_recall.py` (the EDM2 papers' use), the two
sets keep their sizes (the evaluator compares 50 000 samples with 10 000 reference images).

Distances come in blocks of `block` x `block` (10 000 in the evaluator). In the evaluator's mode,
'float16', a block is computed from float16 copies of the features (||a||^2 + ||b||^2 - 2 a.b, clamped at
0) and recomputed in float32 when any of its entries is inf or NaN (float16 overflows at 65 504, i.e.
for feature norms above ~256). Mode 'float32' computes every block in float32.

Accuracy of the float16 mode: with u = 2^-11 (float16's unit roundoff), each squared distance is within
8 u (||a||^2 + ||b||^2) of the exact one (rounding of the inputs, norms, product and result), so a
sample's decision can differ from exact arithmetic only when its distance to a ball's centre is that
close to the ball's radius; the TensorFlow evaluator's float16 arithmetic has the same bound.
"""

import torch

K = 3
BLOCK = 10000
MODES = ('float16', 'float32')


def _sq_dists(a, b):
    return ((a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * (a @ b.T)).clamp_min_(0)


def pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor, mode: str = 'float16') -> torch.Tensor:
    """Squared Euclidean distances [len(a), len(b)] as float32, computed in `mode` (see module docstring)."""
    if mode not in MODES:
        raise ValueError(f'unknown distance mode {mode!r}; choose from {", ".join(MODES)}')
    if mode == 'float16':
        # Inputs, squared norms and the result are rounded to float16 as in the evaluator's float16 graph
        # (so an overflow anywhere triggers the same fallback); sums and products accumulate in float32, as
        # GPU float16 kernels do and as CPUs without fast float16 arithmetic need.
        a16, b16 = a.to(torch.float16).to(torch.float32), b.to(torch.float16).to(torch.float32)
        na = (a16 * a16).sum(1).to(torch.float16).to(torch.float32)
        nb = (b16 * b16).sum(1).to(torch.float16).to(torch.float32)
        ab = (a16 @ b16.T).to(torch.float16).to(torch.float32)
        d = (na[:, None] + nb[None, :] - 2 * ab).to(torch.float16)
        if bool(torch.isfinite(na).all() and torch.isfinite(nb).all() and torch.isfinite(d).all()):
            return d.clamp_min_(0).to(torch.float32)
    return _sq_dists(a.to(torch.float32), b.to(torch.float32))


def manifold_radii(features: torch.Tensor, k: int = K, mode: str = 'float16', block: int = BLOCK) -> torch.Tensor:
    """Squared distance of every feature to its k-th nearest other feature [N] (float32)."""
    n = features.shape[0]
    if n <= k:
        raise ValueError(f'need more than k={k} features, got {n}')
    radii = torch.empty(n, dtype=torch.float32, device=features.device)
    for start in range(0, n, block):
        rows = features[start:start + block]
        d = torch.cat([pairwise_sq_distances(rows, features[c:c + block], mode) for c in range(0, n, block)], dim=1)
        radii[start:start + block] = d.kthvalue(k + 1, dim=1).values  # the (k+1)-th smallest is the point itself
    return radii


def coverage(queries: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, mode: str = 'float16',
             block: int = BLOCK) -> float:
    """Share of `queries` within the squared radius of at least one of `centers`."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for start in range(0, queries.shape[0], block):
        for c in range(0, centers.shape[0], block):
            d = pairwise_sq_distances(queries[start:start + block], centers[c:c + block], mode)
            inside[start:start + block] |= (d <= radii[None, c:c + block]).any(dim=1)
    return float(inside.to(torch.float64).mean())


def adm_precision_recall(reference, samples, k: int = K, mode: str = 'float16', block: int = BLOCK, device=None):
    """(precision, recall) of `samples` [N, D] against `reference` [M, D] features, as the ADM evaluator."""
    ref = torch.as_tensor(reference).to(device=device, dtype=torch.float32)
    gen = torch.as_tensor(samples).to(device=device, dtype=torch.float32)
    if ref.ndim != 2 or gen.ndim != 2 or ref.shape[1] != gen.shape[1]:
        raise ValueError(f'feature sets do not match: {list(ref.shape)} vs {list(gen.shape)}')
    ref_radii = manifold_radii(ref, k, mode, block)
    gen_radii = manifold_radii(gen, k, mode, block)
    return coverage(gen, ref, ref_radii, mode, block), coverage(ref, gen, gen_radii, mode, block)
