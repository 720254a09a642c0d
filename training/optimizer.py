"""The optimiser of EDM2 training: Adam and the learning-rate schedule (EDM2 paper, Sec. 2.4)."""

import math

import torch


def learning_rate(cur_nimg, batch, lr, decay, rampup):
    """alpha(t) = alpha_ref / sqrt(max(t / (t_ref B), 1)) * min(t / rampup, 1) at t = `cur_nimg` images:
    the inverse-square-root decay after t_ref = `decay` batches of the EDM2 paper (Sec. 2.4, Config E),
    times a linear warm-up over `rampup` images (0 disables either part)."""
    value = lr
    if decay > 0:
        value /= math.sqrt(max(cur_nimg / (decay * batch), 1))
    if rampup > 0:
        value *= min(cur_nimg / rampup, 1)
    return value


def adam(params, lr):
    """Adam (0.9, 0.99), eps 1e-8, no weight decay (the EDM2 paper's training configuration); the
    fused kernel where torch has one (several times faster than the per-tensor loop on the CPU)."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, fused=True)
    except (RuntimeError, TypeError, ValueError):  # older torch or an unsupported device
        return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.99), eps=1e-8, foreach=True)
