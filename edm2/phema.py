"""Power-function EMA: the profile mathematics (sigma_rel <-> gamma, inner products, the post-hoc
least-squares weights and their error bound) and the tracker that keeps EMAs during training.

EDM2 paper (Karras et al. 2024), Sec. 3 and its appendix on post-hoc EMA: an EMA profile with exponent
gamma averages the weights theta(tau) with density proportional to tau**gamma on [0, t]; its relative
standard deviation sigma_rel is a function of gamma alone. Reconstructing networks from stored
snapshots (reading files, streaming sums) is `edm2.phema_reconstruct`.

    exp_to_std, std_to_exp, power_function_beta    sigma_rel <-> gamma, the tracking decay
    PowerFunctionEMA(net, stds)                    tracker used during training
    profile_inner, solve_coefficients, fit_error   post-hoc solver (float64) and its error bound
    kimg_to_nimg                                   image count of a snapshot labelled in kimg
"""

import copy

import numpy as np
import torch

from edm2.errors import EDM2Error

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 limit: the uniform average over [0, t]
# gamma ~ 1/sigma_rel for small lengths: below 1e-6 the profile covers less than a millionth of the training
# time, under one optimiser step of the longest published runs (~1e6 steps). A floor also keeps sigma_rel^-2
# (std_to_exp) finite.
SIGMA_REL_MIN = 1e-6


class PhemaError(EDM2Error):
    """A one-line, user-facing problem with the inputs or the requested outputs of a reconstruction."""


def exp_to_std(gamma):
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_to_exp(std):
    """gamma = the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0, s = sigma_rel
    (the relation above, solved for gamma)."""
    std = float(std)
    if not SIGMA_REL_MIN <= std < SIGMA_REL_MAX:
        raise PhemaError(f'EMA length sigma_rel={std:g} outside [{SIGMA_REL_MIN:g}, {SIGMA_REL_MAX:.4f})')
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-6 * np.maximum(1, np.abs(roots))].real.max())


def power_function_beta(std, t_next, t_delta):
    """EMA decay for the step that brings the image count to t_next: beta = (1 - dt/t)^(gamma+1)."""
    gamma = std_to_exp(std)
    return float((1 - t_delta / t_next) ** (gamma + 1))


def kimg_to_nimg(kimg):
    """Images seen for a snapshot labelled `kimg`: training times are multiples of the batch, and the
    published trainer labels them images//1000, so readers round up to the 1024-image grid."""
    return ((int(kimg) * 1000 + 999) // 1024) * 1024


# ----------------------------------------------------------------------------------------------------
# Tracking during training: one EMA copy of the network per sigma_rel.

class PowerFunctionEMA:
    """Power-function EMA of a network's parameters at several relative lengths sigma_rel.

    Usage in a training loop (after the optimiser step that brought the image count to cur_nimg):
        ema = PowerFunctionEMA(net, stds=(0.050, 0.100))
        ...
        ema.update(cur_nimg=cur_nimg, batch_size=batch_size)
        for ema_net, std in ema.get(): save_network(..., ema_net, ema_std=std)

    Only parameters are averaged; buffers (e.g. the fixed Fourier features) are copied from the net.
    The EMA copies live on the net's device in the net's dtype and never require gradients.
    """

    def __init__(self, net, stds=(0.050, 0.100)):
        self.net = net
        self.stds = tuple(float(std) for std in stds)
        for std in self.stds:
            std_to_exp(std)  # validates 0 < std < SIGMA_REL_MAX with a one-line ValueError
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _std in self.stds]

    def _pairs(self, ema):
        return zip(self.net.parameters(), ema.parameters())

    def reset(self):
        """Make every EMA copy equal to the current network weights."""
        with torch.no_grad():
            for ema in self.emas:
                for p_net, p_ema in self._pairs(ema):
                    p_ema.copy_(p_net.detach())
                self._copy_buffers(ema)

    def _copy_buffers(self, ema):
        for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
            b_ema.copy_(b_net.detach())

    def update(self, cur_nimg, batch_size):
        """Apply one tracking step: ema <- beta*ema + (1-beta)*theta, beta = (1 - dt/t)^(gamma+1),
        for the step of `batch_size` images that brought the count to `cur_nimg` (EDM2 paper, Sec. 3.1 and
        its appendix on post-hoc EMA).
        On the first step (cur_nimg == batch_size) beta = 0, so the EMA becomes the weights."""
        if not cur_nimg > 0 or not 0 < batch_size <= cur_nimg:
            raise ValueError(f'EMA update needs 0 < batch_size <= cur_nimg, got batch_size={batch_size}, '
                             f'cur_nimg={cur_nimg}')
        with torch.no_grad():
            for ema, std in zip(self.emas, self.stds):
                beta = power_function_beta(std, cur_nimg, batch_size)
                src = [p.detach() for p in self.net.parameters()]
                dst = list(ema.parameters())
                if all(s.dtype == d.dtype and s.device == d.device for s, d in zip(src, dst)):
                    torch._foreach_lerp_(dst, src, 1 - beta)  # one fused launch per EMA on GPU
                else:
                    for s, d in zip(src, dst):
                        d.lerp_(s.to(d.dtype), 1 - beta)
                self._copy_buffers(ema)

    def get(self):
        """[(ema_net, std), ...] in the order of `stds`."""
        return list(zip(self.emas, self.stds))

    def state_dict(self):
        """Plain dict of floats, lists and tensors, loadable with torch.load(weights_only=True)."""
        return {'stds': list(self.stds), 'emas': [dict(ema.state_dict()) for ema in self.emas]}

    def load_state_dict(self, state):
        stds = tuple(float(std) for std in state['stds'])
        if len(stds) != len(self.stds) or any(abs(a - b) > 1e-9 for a, b in zip(stds, self.stds)):
            raise ValueError(f'EMA state has stds {list(stds)}, this tracker has {list(self.stds)}')
        for ema, sd in zip(self.emas, state['emas']):
            ema.load_state_dict(sd)


# ----------------------------------------------------------------------------------------------------
# Post-hoc reconstruction weights (EDM2 paper, Sec. 3.2 and its appendix on post-hoc EMA).

def profile_inner(t_a, gamma_a, t_b, gamma_b):
    """<a, b> = integral of the product of two unit-mass power-function profiles (broadcasting, float64).

    Profile (t, gamma) has density (gamma+1) tau^gamma / t^(gamma+1) on [0, t]; integrating the product
    over [0, min(t_a, t_b)] gives
    (gamma_a+1)(gamma_b+1) (t_a/t_b)^e / ((gamma_a+gamma_b+1) max(t_a, t_b)), e = gamma_b if t_a < t_b else -gamma_a.
    """
    t_a, gamma_a, t_b, gamma_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    e = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * (t_a / t_b) ** e / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(in_times, in_stds, out_times, out_stds):
    """Least-squares weights X [inputs, outputs] such that sum_i X_ij * profile_i ~ target profile j.

    For each target only the snapshots with t_i <= t_j take part (the rest get weight 0): A_ik = <i, k>,
    b_i = <i, target>, solve A x = b in float64, then normalise x to sum 1. A is the Gram
    matrix of the stored profiles, symmetric positive definite when no profile repeats, so a direct
    solve is exact to rounding (a truncated least-squares solve would perturb tiny weights); a singular
    A falls back to the minimum-norm least-squares solution.
    """
    in_times = np.asarray(in_times, dtype=np.float64)
    in_gammas = np.array([std_to_exp(s) for s in in_stds], dtype=np.float64)
    out_times = np.asarray(out_times, dtype=np.float64)
    out_gammas = np.array([std_to_exp(s) for s in out_stds], dtype=np.float64)
    X = np.zeros([len(in_times), len(out_times)], dtype=np.float64)
    for t in np.unique(out_times):  # one Gram matrix per target time, all lengths at once
        rows, cols = np.flatnonzero(in_times <= t), np.flatnonzero(out_times == t)
        if len(rows) == 0:
            raise PhemaError(f'no snapshot at or before the target time {t:.0f} images')
        ti, gi = in_times[rows], in_gammas[rows]
        A = profile_inner(ti[:, None], gi[:, None], ti[None, :], gi[None, :])
        B = profile_inner(ti[:, None], gi[:, None], t, out_gammas[None, cols])
        try:
            x = np.linalg.solve(A, B)
            if not np.all(np.isfinite(x)):
                raise np.linalg.LinAlgError
        except np.linalg.LinAlgError:
            x = np.linalg.lstsq(A, B, rcond=None)[0]
        X[np.ix_(rows, cols)] = x / x.sum(axis=0, keepdims=True)
    return X


def fit_error(in_times, in_stds, weights, out_time, out_std):
    """rho = sqrt(t * <r, r>) for the residual profile r = sum_i w_i p_i - p_target (float64, closed form).

    Tracking with beta = (1 - dt/t)^(gamma+1) averages the piecewise-constant weight trajectory exactly
    with the continuous profile (the betas telescope to (t_k/t)^(gamma+1)), and sum(w) = 1 makes r
    integrate to 0, so by Cauchy-Schwarz every coordinate of (reconstruction - true EMA) is bounded by
    rho * (the time-weighted standard deviation of that coordinate over [0, t]). rho is scale-free.
    """
    t = np.asarray(in_times, dtype=np.float64)
    g = np.array([std_to_exp(s) for s in in_stds], dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    g_out = std_to_exp(out_std)
    A = profile_inner(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_inner(t, g, float(out_time), g_out)
    rr = w @ A @ w - 2 * w @ b + profile_inner(float(out_time), g_out, float(out_time), g_out)
    return float(np.sqrt(max(rr, 0.0) * out_time))
