"""Sampling in the toy example: the EDM Heun sampler on scores, guidance (autoguidance, CFG, naive
truncation) and the idealised models whose only error is a loss of resolution (autoguidance paper,
Figure 1; EDM paper, Algorithm 1 without churn).
"""

import math

import torch

from edm2.guidance_rules import Lerp, parse_rule
from edm2.sampling import edm_schedule
from edm2.toy.mixture import ToyError, gt


class GuidedScore:
    """Score of the guided denoiser D_w (autoguidance paper eq. 2 with a guidance rule), called as (x, sigma).

    With the default rule (lerp) score_w = w s_1 + (1 - w) s_0, the same line as D_w = w D_1 + (1 - w) D_0.
    Any other rule of `edm2.guidance_rules` combines the denoisers D_k = x + sigma^2 s_k (Tweedie's formula,
    as in `heun_sample`), each 2D point being one 'image' of the rule, and the result is turned back into a
    score, (D - x) / sigma^2. guide=None is a guide whose score is zero (D_0(x) = x), i.e. naive truncation:
    with lerp the score is scaled by w. With w = 1 the guide is never evaluated.

    `evaluate(x, sigma, state) -> (score, state)` is one evaluation of a sampler run, `state` the rule's
    state of the run (APG's momentum; None at its start), which `heun_sample` carries; called as (x, sigma),
    every call is a run of its own. The object keeps no state between calls.
    """

    def __init__(self, net, guide=None, w=1.0, rule=None):
        self.net, self.guide, self.w = net, guide, w
        self.rule = None if rule is None else parse_rule(rule)
        if isinstance(self.rule, Lerp):
            self.rule = None  # the score-space line above: bit-identical to the published toy

    def __call__(self, x, sigma):
        return self.evaluate(x, sigma, None)[0]

    def evaluate(self, x, sigma, state=None):
        s1 = self.net.score(x, sigma)
        if self.w == 1:
            return s1, state
        s0 = self.guide.score(x, sigma) if self.guide is not None else torch.zeros_like(s1)
        if self.rule is None:
            return s1 * self.w + s0 * (1 - self.w), state
        var = sigma ** 2
        denoised, state = self.rule.combine(x + var * s1, x + var * s0, self.w, state)
        return (denoised - x) / var, state


def guided_score(net, guide=None, w=1.0, rule=None):
    """A `GuidedScore`: the score of net guided by `guide` with weight w and `rule` (default lerp)."""
    return GuidedScore(net, guide, w, rule)


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
    the ODE direction (x - D) / sigma is -sigma * score. x_init is already at noise level sigma_max.
    score_fn: a `GuidedScore`, whose rule's state (APG's momentum) lives in this run only, or any
    (x, sigma) -> score."""
    t = edm_schedule(num_steps, sigma_min, sigma_max, rho, dtype=torch.float64).tolist()
    state = None  # the rule's state of this run

    def score(x, sigma):
        nonlocal state
        if not isinstance(score_fn, GuidedScore):
            return score_fn(x, sigma)
        value, state = score_fn.evaluate(x, sigma, state)
        return value

    x = x_init
    for i in range(num_steps):
        t_cur, t_next = t[i], t[i + 1]
        d = -t_cur * score(x, t_cur)
        x_next = x + (t_next - t_cur) * d
        if i < num_steps - 1:  # second-order correction on every step except the last
            d2 = -t_next * score(x_next, t_next)
            x_next = x + (t_next - t_cur) * 0.5 * (d + d2)
        x = x_next.detach()
    return x


METHODS = ('ground truth', 'unguided', 'CFG', 'autoguidance', 'naive truncation')


def sample_methods(net, autoguide, cfg_guide, num=20000, seed=0, ag_weight=3.0, cfg_weight=4.0,
                   trunc_weight=1.5, num_steps=32, sigma_max=5.0, device='cpu', classes='A', rule=None):
    """Samples of every method of Figure 1, {name: [num, 2] float32 CPU tensor}.

    All guided/unguided methods start from the SAME initial points: ground truth of `classes` diffused to
    sigma_max (autoguidance paper, Appendix C). 'ground truth' is an independent draw of the clean mixture.
    `rule` (a guidance rule or its spec; default lerp) combines every guided method's denoisers.
    """
    mixture = gt(classes)
    gen = torch.Generator().manual_seed(int(seed))
    x_init = mixture.sample(num, sigma_max, gen, device=device)
    reference = mixture.sample(num, 0.0, gen)
    runs = {
        'unguided': guided_score(net),
        'CFG': guided_score(net, cfg_guide, cfg_weight, rule),
        'autoguidance': guided_score(net, autoguide, ag_weight, rule),
        'naive truncation': guided_score(net, None, trunc_weight, rule),
    }
    out = {'ground truth': reference}
    for name, score_fn in runs.items():
        out[name] = heun_sample(score_fn, x_init, num_steps=num_steps, sigma_max=sigma_max).to('cpu', torch.float32)
    return out


def sample_rules(net, guide, rules, w=3.0, num=20000, seed=0, num_steps=32, sigma_max=5.0, device='cpu',
                 classes='A'):
    """Guided samples of `net` with `guide` at one weight w under each guidance rule (specs or rule objects),
    {canonical spec: [num, 2] float32 CPU tensor}, all from the same initial points as `sample_methods`."""
    gen = torch.Generator().manual_seed(int(seed))
    x_init = gt(classes).sample(num, sigma_max, gen, device=device)
    out = {}
    for rule in (parse_rule(r) for r in rules):
        x = heun_sample(guided_score(net, guide, w, rule), x_init, num_steps=num_steps, sigma_max=sigma_max)
        out[str(rule)] = x.to('cpu', torch.float32)
    return out
