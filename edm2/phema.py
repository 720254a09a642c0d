"""Power-function EMA (EDM2 paper, section 3 and appendix C; SPEC section 4).

An EMA profile with exponent gamma averages the weights theta(tau) with density proportional to
tau**gamma on [0, t]. Its relative standard deviation sigma_rel is a function of gamma alone.
"""

import numpy as np

SIGMA_REL_MAX = 12 ** -0.5  # gamma -> 0 limit: the uniform average over [0, t]


def exp_to_std(gamma):
    """sigma_rel = sqrt((gamma+1) / ((gamma+2)^2 (gamma+3)))."""
    gamma = np.float64(gamma)
    return float(np.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3))))


def std_to_exp(std):
    """gamma = the largest real root of g^3 + 7g^2 + (16 - s^-2) g + (12 - s^-2) = 0, s = sigma_rel."""
    std = float(std)
    if not 0 < std < SIGMA_REL_MAX:
        raise ValueError(f'EMA length sigma_rel={std} outside (0, {SIGMA_REL_MAX:.4f})')
    inv = std ** -2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(roots[np.abs(roots.imag) < 1e-6 * np.maximum(1, np.abs(roots))].real.max())


def power_function_beta(std, t_next, t_delta):
    """EMA decay for the step that brings the image count to t_next: beta = (1 - dt/t)^(gamma+1)."""
    gamma = std_to_exp(std)
    return float((1 - t_delta / t_next) ** (gamma + 1))


# ----------------------------------------------------------------------------------------------------
# Tracking during training (SPEC section 4): one EMA copy of the network per sigma_rel.

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
        import copy
        self.net = net
        self.stds = tuple(float(std) for std in stds)
        for std in self.stds:
            std_to_exp(std)  # validates 0 < std < SIGMA_REL_MAX with a one-line ValueError
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _std in self.stds]

    def _pairs(self, ema):
        return zip(self.net.parameters(), ema.parameters())

    def reset(self):
        """Make every EMA copy equal to the current network weights."""
        import torch
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
        for the step of `batch_size` images that brought the count to `cur_nimg` (SPEC section 4).
        On the first step (cur_nimg == batch_size) beta = 0, so the EMA becomes the weights."""
        import torch
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
