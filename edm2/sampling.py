"""The EDM sampler: a noise schedule, stochastic Heun steps, and guidance by one or several guiding networks.

Three pieces that compose, each usable alone:

- a schedule is a plain function returning the noise levels σ_0 > … > σ_{N−1} followed by σ_N = 0
  (`edm_schedule`, EDM paper eq. 5);
- `heun_sampler(denoiser, noise, sigmas, labels, options)` integrates the probability-flow ODE over the
  consecutive pairs of that tensor with Heun's method and optional churn (EDM paper, Karras et al. 2022,
  Algorithm 2); its settings besides the schedule are one `HeunOptions`;
- `GuidedDenoiser` combines a main network and guiding networks into one callable with the denoiser's
  signature. Whether a step is guided is decided once per Heun step by the sampler (`guided_steps`, e.g.
  from a `SigmaInterval` or `StepInterval`, the guidance interval of Kynkäänniemi et al., NeurIPS 2024)
  and passed to the wrapper for both evaluations of that step.

A denoiser is anything called as `D(x, sigma, labels)` that returns D(x; σ, c) shaped like x, such as
`edm2.networks.Precond` (the protocol `edm2.denoiser.Denoiser`). A guided denoiser also offers one
evaluation of a run with an explicit state (`edm2.denoiser.StatefulDenoiser`): the sampler starts every run
with no state and carries it from evaluation to evaluation, so the memory of a guidance rule (APG's
momentum) can never outlive its run or meet a batch of another size. `Guidance` bundles what
`edm2.generation.generate` needs to build the guided denoiser and its per-step decisions.
"""

import dataclasses
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from .denoiser import StatefulDenoiser
from .errors import EDM2Error
from .guidance_rules import Lerp, Rule, parse_rule


class SamplingError(EDM2Error):
    """Invalid sampler or guidance settings; the message is one line meant for users."""


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


# ----------------------------------------------------------------------------------------------------
# Schedule.

def edm_schedule(num_steps: int = 32, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 *, dtype=torch.float32) -> torch.Tensor:
    """The N + 1 noise levels of an N-step EDM sampler, ending with σ_N = 0 (EDM paper eq. 5):

        σ_i = (σ_max^(1/ρ) + i/(N − 1) · (σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ  for i < N.

    Computed in `dtype`, the precision the sampler runs in (float32 reproduces the published images:
    the same formula evaluated in float64 and rounded differs in the last bit at most steps). Raises
    SamplingError unless the levels are finite, positive and strictly decreasing in that precision.
    """
    for name, value in (('sigma_min', sigma_min), ('sigma_max', sigma_max), ('rho', rho)):
        if not (_is_number(value) and math.isfinite(value) and value > 0):
            raise SamplingError(f'{name} must be a positive finite number, got {value!r}')
    if not (isinstance(num_steps, numbers.Integral) and num_steps >= 1):
        raise SamplingError(f'the number of steps must be a positive integer, got {num_steps!r}')
    num_steps, sigma_min, sigma_max, rho = int(num_steps), float(sigma_min), float(sigma_max), float(rho)
    if sigma_min > sigma_max:
        raise SamplingError(f'sigma_min {sigma_min:g} exceeds sigma_max {sigma_max:g}')
    try:
        root_max, root_min = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    except OverflowError:
        root_max = root_min = math.inf
    with torch.no_grad():
        ramp = torch.arange(num_steps, dtype=dtype) / max(num_steps - 1, 1)  # i / (N - 1), from 0 to 1
        levels = (root_max + ramp * (root_min - root_max)) ** rho
        sigmas = torch.cat([levels, levels.new_zeros(1)])
    if not (math.isfinite(root_max) and torch.isfinite(levels).all() and (levels > 0).all()
            and (sigmas[1:] < sigmas[:-1]).all()):
        raise SamplingError(f'sigma_min {sigma_min:g}, sigma_max {sigma_max:g}, rho {rho:g} give {num_steps} '
                            f'noise levels that are not finite, positive and strictly decreasing in {dtype}')
    return sigmas


# ----------------------------------------------------------------------------------------------------
# The Heun sampler.

SOLVERS = ('heun', 'euler')


@dataclasses.dataclass(frozen=True)
class HeunOptions:
    """Settings of the stochastic Heun sampler besides its schedule (EDM paper, Algorithm 2)."""

    S_churn: float = 0.0                # total churn; a churned step raises σ by γ = min(S_churn / N, √2 − 1)
    S_min: float = 0.0                  # steps with S_min <= σ_i <= S_max are churned (when S_churn > 0)
    S_max: float = math.inf
    S_noise: float = 1.0                # scale of the fresh churn noise
    dtype: torch.dtype = torch.float32  # arithmetic of x and σ; networks run in their own precision
    solver: str = 'heun'                # 'heun' (second order) or 'euler' (first order: one evaluation per step)

    def __post_init__(self):
        for name in ('S_churn', 'S_min', 'S_max', 'S_noise'):
            value = getattr(self, name)
            if not _is_number(value) or math.isnan(value) or value < 0 or \
                    (name != 'S_max' and math.isinf(value)):
                raise SamplingError(f'{name} must be a non-negative finite number'
                                    f'{" or inf" if name == "S_max" else ""}, got {value!r}')
        if not self.dtype.is_floating_point:
            raise SamplingError(f'the sampler needs a floating-point dtype, got {self.dtype}')
        if self.solver not in SOLVERS:
            raise SamplingError(f'unknown solver {self.solver!r}; expected one of: {", ".join(SOLVERS)}')

    def churn(self, sigma: float, num_steps: int) -> float:
        """γ_i of a step whose schedule level is `sigma`: 0 outside [S_min, S_max]."""
        if self.S_churn == 0 or not self.S_min <= sigma <= self.S_max:
            return 0.0
        return min(self.S_churn / num_steps, math.sqrt(2) - 1)


def ode_derivative(x: torch.Tensor, sigma, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x − D(x; σ)) / σ (EDM paper eqs. 1 and 3 with σ(t) = t)."""
    return (x - denoised) / sigma


def per_image_noise(generators, like: torch.Tensor) -> torch.Tensor:
    """Standard normal noise shaped like `like`, image k drawn from generators[k] (an image's noise
    never depends on its batch mates)."""
    draws = [torch.randn(like.shape[1:], generator=g, device=like.device, dtype=torch.float32) for g in generators]
    return torch.stack(draws).to(like.dtype)


def _raise_noise(x, sigma, gamma, S_noise, generators):
    """Churn (EDM paper, Algorithm 2, lines 5–6): add fresh noise so that x's level rises from σ to
    σ̂ = σ + γσ. Returns (x̂, σ̂)."""
    sigma_hat = sigma + gamma * sigma
    fresh = per_image_noise(generators, x) if generators is not None else torch.randn_like(x)
    return x + (sigma_hat ** 2 - sigma ** 2).sqrt() * S_noise * fresh, sigma_hat


@torch.no_grad()
def heun_sampler(denoiser, noise: torch.Tensor, sigmas: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 options: HeunOptions = HeunOptions(), *, guided_steps: Optional[Sequence[bool]] = None,
                 generators=None) -> torch.Tensor:
    """Integrate from x_0 = noise · σ_0 down to σ_N = 0; returns the samples in `options.dtype`.

    denoiser:     a `edm2.denoiser.Denoiser`, called as denoiser(x, sigma, labels) with sigma a 0-dim
                  tensor on x's device; or a `edm2.denoiser.StatefulDenoiser` (e.g. a `GuidedDenoiser`),
                  called as denoiser.evaluate(x, sigma, labels, guided, state), the state None at the
                  first evaluation of this run and then the one the previous evaluation returned.
    noise:        [n, C, H, W] standard normal initial noise.
    sigmas:       the schedule, N + 1 decreasing levels ending with 0 (e.g. `edm_schedule`); N steps and
                  2N − 1 denoiser evaluations (the step into σ = 0 is a plain Euler step); N evaluations
                  with `options.solver == 'euler'` (every step an Euler step, Karras et al. 2022, sec. 3:
                  between two levels of a DDIM schedule it is DDIM's deterministic step).
    labels:       [n, label_dim] one-hot classes for a conditional denoiser, or None.
    guided_steps: N booleans, the guidance decision of each step, passed to both of its evaluations
                  (a StatefulDenoiser only); None: every step guided.
    generators:   one torch.Generator per image for the churn noise; None uses the global generator.

    The run's state is a local of this call: it starts empty here and is dropped on return, so no state of
    another run or batch can reach this one.
    """
    sigmas = sigmas.detach().to('cpu', options.dtype)  # 0-dim scalars for the arithmetic, no device syncs
    num_steps = len(sigmas) - 1
    if num_steps < 1 or sigmas[-1] != 0:
        raise SamplingError(f'a schedule needs at least two levels, the last one 0; got {sigmas.tolist()}')
    if guided_steps is not None and len(guided_steps) != num_steps:
        raise SamplingError(f'{len(guided_steps)} guidance decisions given for {num_steps} steps')
    if generators is not None and len(generators) != noise.shape[0]:
        raise SamplingError(f'{len(generators)} generators given for a batch of {noise.shape[0]} images')
    stateful = isinstance(denoiser, StatefulDenoiser)
    if guided_steps is not None and not stateful:
        raise SamplingError(f'guidance decisions given for a {type(denoiser).__name__}, which has no '
                            f'evaluate(x, sigma, labels, guided, state) (e.g. a GuidedDenoiser)')

    gammas = [options.churn(float(s), num_steps) for s in sigmas[:-1]]
    hats = [s + g * s if g > 0 else s for s, g in zip(sigmas[:-1], gammas)]
    # The levels the networks see (σ̂_i, then σ_{i+1}), moved to the device once.
    seen = torch.stack(hats + list(sigmas[1:])).to(noise.device)

    state = None  # the guidance state of this run (e.g. APG's momentum), carried from evaluation to evaluation

    def evaluate(x, level, step):
        nonlocal state
        if not stateful:
            return denoiser(x, level, labels)
        guided = True if guided_steps is None else bool(guided_steps[step])
        denoised, state = denoiser.evaluate(x, level, labels, guided, state)
        return denoised

    x = noise.to(options.dtype) * sigmas[0]
    for i in range(num_steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_hat = sigma
        if gammas[i] > 0:
            x, sigma_hat = _raise_noise(x, sigma, gammas[i], options.S_noise, generators)
        h = sigma_next - sigma_hat  # the step's increment in σ (negative)
        slope = ode_derivative(x, sigma_hat, evaluate(x, seen[i], i))
        x_euler = x + h * slope
        if i == num_steps - 1 or options.solver == 'euler':  # D is not evaluated at σ = 0: the last step
            x = x_euler                                          # stays first order
            continue
        slope_end = ode_derivative(x_euler, sigma_next, evaluate(x_euler, seen[num_steps + i], i))
        x = x + h * ((slope + slope_end) * 0.5)  # trapezoidal rule: mean of the slopes at both ends
    return x


# ----------------------------------------------------------------------------------------------------
# Guidance.

@dataclasses.dataclass(frozen=True)
class SigmaInterval:
    """Guide the Heun steps whose schedule level σ_i (before churn) lies in (lo, hi] (Kynkäänniemi et al.,
    NeurIPS 2024, as their code decides it: once per step, for both evaluations)."""

    lo: float
    hi: float = math.inf

    def __post_init__(self):
        lo, hi = self.lo, self.hi
        if not (_is_number(lo) and _is_number(hi)) or math.isnan(lo) or \
                math.isnan(hi) or not 0 <= lo <= hi or math.isinf(lo):
            raise SamplingError(f'guidance interval must satisfy 0 <= LO <= HI, got ({lo!r}, {hi!r}]')

    def select(self, sigmas: torch.Tensor) -> list:
        """One boolean per step of the schedule `sigmas`: whether that step is guided."""
        return [self.lo < s <= self.hi for s in sigmas[:-1].tolist()]


@dataclasses.dataclass(frozen=True)
class StepInterval:
    """Guide the Heun steps first…last (inclusive, counted from 0), as the guidance-interval paper's own
    command lines name an interval (e.g. 17–22 for EDM2-XXL at 32 steps)."""

    first: int
    last: int

    def __post_init__(self):
        if not (isinstance(self.first, numbers.Integral) and isinstance(self.last, numbers.Integral)) or \
                not 0 <= self.first <= self.last:
            raise SamplingError(f'guidance interval steps must satisfy 0 <= FIRST <= LAST, '
                                f'got {self.first!r},{self.last!r}')

    def select(self, sigmas: torch.Tensor) -> list:
        num_steps = len(sigmas) - 1
        if self.last >= num_steps:
            raise SamplingError(f'guidance interval steps {self.first},{self.last} lie outside the schedule '
                                f'of {num_steps} steps (0..{num_steps - 1})')
        return [self.first <= i <= self.last for i in range(num_steps)]


Interval = Union[SigmaInterval, StepInterval]


def guide_shares(num_guides: int, shares=None) -> list:
    """The shares a_k of several guides: given ones checked (finite, >= 0, summing to 1), else equal."""
    if shares is None:
        return [1.0 / num_guides] * num_guides
    shares = [float(a) for a in shares]
    if len(shares) != num_guides:
        raise SamplingError(f'{len(shares)} guide weights given for {num_guides} guiding network(s)')
    if any(not math.isfinite(a) or a < 0 for a in shares):
        raise SamplingError(f'guide weights must be finite and non-negative, got {shares}')
    if abs(sum(shares) - 1) > 1e-6:
        raise SamplingError(f'guide weights must sum to 1, got {shares} (sum {sum(shares):g})')
    return shares


def check_guide(net, guide, name='guiding network') -> None:
    """Raise SamplingError unless `guide` makes images of the main network's shape and takes either the
    same class labels or none (label_dim 0: an unconditional guide, as in classifier-free guidance)."""
    for attr in ('img_channels', 'img_resolution'):
        ours, theirs = getattr(net, attr, None), getattr(guide, attr, None)
        if ours != theirs:
            raise SamplingError(f'{name} has {attr}={theirs} but the main network has {attr}={ours}')
    ours, theirs = getattr(net, 'label_dim', 0), getattr(guide, 'label_dim', 0)
    if theirs not in (0, ours):
        raise SamplingError(f'{name} has label_dim={theirs}; expected {ours} (as the main network) or 0')


class GuidedDenoiser:
    """A main denoiser D_1 guided by denoisers D_0k, as one callable. With the default rule (`Lerp`):

        D = D_1 + Σ_k w_k (D_1 − D_0k),   w_k = (w − 1) a_k,   a_k >= 0,  Σ_k a_k = 1.

    With one guide this is D_0 + w (D_1 − D_0), the guidance of the autoguidance paper (Karras et al.,
    NeurIPS 2024), computed as torch.lerp(D_0, D_1, w); several guides are its DeepFloyd experiment.
    Because the a_k sum to 1, D equals one-guide guidance with the mixed guide D_0 = Σ_k a_k D_0k, which is
    how it is computed; guides with a_k = 0 are never evaluated. Another rule (`edm2.guidance_rules`)
    combines D_1 with the same mixed guide D_0.

    net, guides: the denoisers; a conditional guide gets the labels, an unconditional one (label_dim 0) None.
    weight:      w; 1 is no guidance, and then no guide is ever evaluated.
    shares:      a_k (default equal).
    dtype:       every network output is cast to it.
    rule:        how D_1 and D_0 combine: a rule of `edm2.guidance_rules` or its spec string (default lerp).

    `evaluate(x, sigma, labels, guided, state) -> (D, state)` is one evaluation of a sampler run (the
    `edm2.denoiser.StatefulDenoiser` protocol, which `heun_sampler` follows): `guided=False` evaluates D_1
    alone, and `state` is the rule's state of the run (None at its start; see `edm2.guidance_rules`).
    Called as (x, sigma, labels=None, guided=True) it is a plain `edm2.denoiser.Denoiser`: every call is a
    run of its own, with a fresh state (so APG's momentum has no effect there; a sampler that wants it
    carries the state through `evaluate`). The object keeps no state of a run; `num_evals` counts the
    calls of [D_1, D_01, D_02, ...].
    """

    def __init__(self, net, guides=(), weight: float = 1.0, shares=None, dtype=torch.float32, rule: Rule = Lerp()):
        self.net, self.guides = net, list(guides)
        self.weight = float(weight)
        if not math.isfinite(self.weight):
            raise SamplingError(f'guidance weight must be finite, got {weight}')
        if self.weight != 1 and not self.guides:
            raise SamplingError(f'guidance {self.weight:g} needs at least one guiding network')
        for k, guide in enumerate(self.guides):
            check_guide(net, guide, f'guiding network {k + 1}' if len(self.guides) > 1 else 'guiding network')
        self.shares = guide_shares(len(self.guides), shares) if self.guides else []
        self.dtype = dtype
        self.rule = parse_rule(rule)
        self.num_evals = [0] * (1 + len(self.guides))

    @property
    def active(self) -> bool:
        return self.weight != 1 and bool(self.guides)

    def _run(self, slot, net, x, sigma, labels):
        self.num_evals[slot] += 1
        return net(x, sigma, labels).to(self.dtype)

    def __call__(self, x, sigma, labels=None, guided=True) -> torch.Tensor:
        return self.evaluate(x, sigma, labels, guided, None)[0]

    def evaluate(self, x, sigma, labels=None, guided=True, state=None):
        sigma = torch.as_tensor(sigma, device=x.device)
        main = self._run(0, self.net, x, sigma, labels)
        if not (guided and self.active):
            return main, state
        mixed = None
        for k, (guide, share) in enumerate(zip(self.guides, self.shares)):
            if share == 0:
                continue
            out = self._run(k + 1, guide, x, sigma, labels if getattr(guide, 'label_dim', 0) else None)
            out = out if share == 1 else out * share
            mixed = out if mixed is None else mixed + out
        return self.rule.combine(main, mixed, self.weight, state)


@dataclasses.dataclass(frozen=True)
class Guidance:
    """How the main network is guided: the input of `GuidedDenoiser` plus the guidance interval."""

    guides: tuple = ()                  # guiding denoisers D_0k (loaded networks)
    weight: float = 1.0                 # w; 1 = no guidance (guides never evaluated)
    shares: Optional[tuple] = None      # a_k of several guides; None = equal
    interval: Optional[Interval] = None  # which Heun steps are guided; None = every step
    rule: Rule = Lerp()                 # how main and guide outputs combine (`edm2.guidance_rules`)

    def denoiser(self, net, dtype=torch.float32) -> GuidedDenoiser:
        return GuidedDenoiser(net, self.guides, self.weight, self.shares, dtype, self.rule)

    def steps(self, sigmas: torch.Tensor) -> Optional[list]:
        """The per-step decisions for `heun_sampler(guided_steps=...)`; None when every step is guided."""
        return None if self.interval is None else self.interval.select(sigmas)
