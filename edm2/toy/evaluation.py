"""Metrics of the toy example: outlier rate, leaf-branch coverage, branch total variation and
log-likelihood of samples under the exact ground truth (the quantities behind the autoguidance paper's
Figure 1, measured)."""

import torch


def outlier_level(mixture, num=200_000, mass=0.99, seed=12345):
    """The log-density level whose superlevel set holds `mass` of the ground truth (Monte Carlo, float64)."""
    gen = torch.Generator().manual_seed(seed)
    ref = mixture.sample(num, 0.0, gen, dtype=torch.float64)
    return float(torch.quantile(mixture.logp(ref), 1 - mass))


def evaluate(samples, mixture, level=None, half=0.5):
    """Metrics of samples [n, 2] against the exact ground truth `mixture` (at sigma = 0), all float64.

    outlier_rate: share of samples with log p below `level` (the 99%-mass level);
    leaf_coverage: share of leaf branches that receive at least `half` of their expected share of the
      in-distribution samples (each sample counts for the branch of its most responsible component);
    branch_tv: total-variation distance between the branch histogram of the in-distribution samples
      and the ground truth's branch masses (0 = identical, 1 = disjoint);
    mean_loglik, median_loglik: of the samples' ground-truth log-likelihood.
    """
    if level is None:
        level = outlier_level(mixture)
    x = samples.detach().to('cpu', torch.float64)
    logp = mixture.logp(x)
    inlier = logp >= level
    branch = mixture.nearest_branch(x[inlier])
    counts = torch.bincount(branch, minlength=mixture.num_branches).to(torch.float64)
    expected = mixture.branch_weights
    q = counts / len(x)
    leaves = mixture.leaf_branches
    covered = (q[leaves] >= half * expected[leaves]).to(torch.float64).mean()
    q_in = counts / counts.sum().clamp_min(1)
    return dict(
        num_samples=len(x),
        outlier_rate=float(1 - inlier.to(torch.float64).mean()),
        leaf_coverage=float(covered),
        branch_tv=float(0.5 * (q_in - expected).abs().sum()),
        mean_loglik=float(logp.mean()),
        median_loglik=float(logp.median()),
    )
