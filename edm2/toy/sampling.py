"""Sampling in the toy example: the EDM Heun sampler on scores, guidance (autoguidance, CFG, naive
truncation) and the idealised models whose only error is a loss of resolution (autoguidance paper,
Figure 1; EDM paper, Algorithm 1 without churn).
"""

import math

import torch

from edm2.sampling import edm_schedule
from edm2.toy.mixture import ToyError, gt


def guided_score(net, guide=None, w=1.0):
    """Score of D_w = w D_1 + (1 - w) D_0 (autoguidance paper eq. 2): score_w = w s_1 + (1 - w) s_0.

    guide=None means a guide whose score is zero (D_0(x) = x), i.e. naive truncation: the score is
    scaled by w. With w = 1 the guide is never evaluated.
    """
    def score(x, sigma):
        s1 = net.score(x, sigma)
        if w == 1:
            return s1
        s0 = guide.score(x, sigma) if guide is not None else torch.zeros_like(s1)
        return s1 * w + s0 * (1 - w)
    return score


class SmoothedGT:
    """An idealised model: the exact score of gt(classes) convolved with N(0, blur^2 I), i.e. the mixture at
    noise level sqrt(sigma^2 + blur^2). Its only error is a loss of resolution below `blur`, the kind of
    error the autoguidance paper argues a guide shares with the main model, only larger (blur = 0: exact)."""

    def __init__(self, classes='A', blur=0.0):
        if not 0 <= float(blur) < math.inf:
            raise ToyError(f'blur must be finite and non-negative, got {blur}')
        self.mixture = gt(classes)
        self.blur = float(blur)

    def score(self, x, sigma):
        return self.mixture.score(x, (sigma ** 2 + self.blur ** 2) ** 0.5)


# Idealised stand-ins for the three trained models of Figure 1: the guides lose twice the main model's resolution.
IDEAL_MAIN_BLUR = 0.02
IDEAL_GUIDE_BLUR = 0.04


def ideal_models(main_blur=IDEAL_MAIN_BLUR, guide_blur=IDEAL_GUIDE_BLUR):
    """{'net', 'autoguide', 'cfg_guide'} as SmoothedGT models (main: class A; guides: A and A+B)."""
    return dict(net=SmoothedGT('A', main_blur), autoguide=SmoothedGT('A', guide_blur),
                cfg_guide=SmoothedGT('AB', guide_blur))


def heun_sample(score_fn, x_init, num_steps=32, sigma_min=0.002, sigma_max=5.0, rho=7.0):
    """EDM Heun sampler (EDM paper Algorithm 1, no churn) on a score: D(x; sigma) = x + sigma^2 score, so
    the ODE direction (x - D) / sigma is -sigma * score. x_init is already at noise level sigma_max."""
    t = edm_schedule(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    x = x_init
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d = -t_cur * score_fn(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # second-order correction on every step except the last
            d2 = -t_next * score_fn(x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next.detach()
    return x


METHODS = ('ground truth', 'unguided', 'CFG', 'autoguidance', 'naive truncation')


def sample_methods(net, autoguide, cfg_guide, num=20000, seed=0, ag_weight=3.0, cfg_weight=4.0,
                   trunc_weight=1.5, num_steps=32, sigma_max=5.0, device='cpu', classes='A'):
    """Samples of every method of Figure 1, {name: [num, 2] float32 CPU tensor}.

    All guided/unguided methods start from the SAME initial points: ground truth of `classes` diffused to
    sigma_max (autoguidance paper, Appendix C). 'ground truth' is an independent draw of the clean mixture.
    """
    mixture = gt(classes)
    gen = torch.Generator().manual_seed(int(seed))
    x_init = mixture.sample(num, sigma_max, gen, device=device)
    reference = mixture.sample(num, 0.0, gen)
    runs = {
        'unguided': guided_score(net),
        'CFG': guided_score(net, cfg_guide, cfg_weight),
        'autoguidance': guided_score(net, autoguide, ag_weight),
        'naive truncation': guided_score(net, None, trunc_weight),
    }
    out = {'ground truth': reference}
    for name, score_fn in runs.items():
        out[name] = heun_sample(score_fn, x_init, num_steps=num_steps, sigma_max=sigma_max).to('cpu', torch.float32)
    return out
