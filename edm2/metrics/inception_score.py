"""Inception Score (Salimans et al., "Improved techniques for training GANs", NeurIPS 2016).

IS = exp( E_x KL( p(y|x) || p(y) ) ), with p(y|x) the softmax of the Inception classifier's logits and
p(y) their mean over the evaluated images. As in the ADM evaluator (Dhariwal & Nichol, NeurIPS 2021;
guided-diffusion `evaluations/evaluator.py`, MIT licence), the samples are cut into contiguous,
unshuffled splits of `split_size` images (the last may be shorter), p(y) is the mean over each split,
and the score is the mean over splits of exp(mean KL) -- 10 splits for 50 000 images. The logits are
those of the 2015 graph: pool features times the classifier weight, without its bias (1008 classes).
"""

import numpy as np
import torch

SPLIT_SIZE = 5000


def inception_score(logits, split_size: int = SPLIT_SIZE) -> float:
    """Inception Score of the logits [N, classes] (rows in sample order), computed in float64."""
    logits = torch.as_tensor(np.asarray(logits)).to(torch.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f'expected logits [N, classes] with N >= 1, got {list(logits.shape)}')
    if split_size < 1:
        raise ValueError(f'split size must be at least 1, got {split_size}')
    # log p(y|x) from log_softmax: exact where p underflows, so p log p is 0 rather than 0 * -inf.
    log_p = torch.log_softmax(logits, dim=1)
    scores = []
    for start in range(0, logits.shape[0], split_size):
        part_log_p = log_p[start:start + split_size]
        part_p = part_log_p.exp()
        log_marginal = part_p.mean(dim=0).log()
        kl = (part_p * (part_log_p - log_marginal)).sum(dim=1)  # KL(p(y|x) || p(y)) per image
        scores.append(float(kl.mean().exp()))
    return float(np.mean(scores))
