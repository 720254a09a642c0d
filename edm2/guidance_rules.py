"""Guidance rules: how the main denoiser's output D1 and the guide's output D0 combine into one D.

Per image, with weight w (1 = no guidance) and ⟨·,·⟩, ‖·‖ over all elements of one image:

- `Lerp` (the default): D = D0 + w (D1 − D0), the guidance of the autoguidance paper (Karras et al.,
  "Guiding a Diffusion Model with a Bad Version of Itself", NeurIPS 2024, eq. 2) and of classifier-free
  guidance.
- `APG`, adaptive projected guidance (Sadat, Hilliges, Weber, "Eliminating Oversaturation and Artifacts of
  High Guidance Scales in Diffusion Models", ICLR 2025, sec. 4–5), on the denoised output: Δ = D1 − D0;
  reverse momentum Δ ← Δ + β m, m ← Δ (m zero at the start of a batch); a norm cap Δ ← Δ · min(1, r/‖Δ‖);
  the split of Δ into its part along D1, Δ∥ = (⟨Δ, D1⟩ / ⟨D1, D1⟩) D1, and the rest Δ⊥ = Δ − Δ∥; then
  D = D1 + (w − 1)(Δ⊥ + η Δ∥). With η = 1 and β = r = 0 this is `Lerp`.
- `Rescale`, guidance rescale (Lin, Liu, Li, Yang, "Common Diffusion Noise Schedules and Sample Steps are
  Flawed", WACV 2024, sec. 3.4, eqs. 15–16): D_g = Lerp; D = φ · D_g · std(D1) / std(D_g) + (1 − φ) · D_g.

A rule is a frozen dataclass (hashable, comparable) whose `str()` is its canonical spec string, the
inverse of `parse_rule`: 'lerp', 'apg:eta=0,momentum=-0.5,threshold=15', 'rescale:phi=0.7'. Values are
normalised: -0 is 0 and every float prints as its shortest round-trip text (1.0 as 1), so equal rules
have equal specs.

Every rule follows `GuidanceRule`: `combine(main, guide, weight, state=None) -> (D, new_state)`, a pure
function of its arguments. A rule with memory across the guided evaluations of one sampler run (APG's
momentum) reads it from `state` and returns the next one; the caller passes None at the start of every
run and each returned state to the run's next guided evaluation. The rule holds nothing itself, and a
state belongs to one batch shape: a state of another shape is refused (RuleError), never broadcast.
"""

import dataclasses
import math
import numbers
from typing import Any, Protocol, Tuple, Union

import torch

from .errors import EDM2Error


class RuleError(EDM2Error):
    """A guidance rule spec that cannot be used; the message is one line naming the value."""


def _per_image(x: torch.Tensor) -> list:
    """The dimensions of one image (all but the batch dimension)."""
    return list(range(1, x.ndim))


def _canonical(value) -> float:
    """A rule value as it is stored: a Python float, with -0 made 0 (so that equal values compare, hash and
    print the same)."""
    value = float(value)
    return 0.0 if value == 0 else value


def _format(value: float) -> str:
    """The shortest text that reads back as the same float (so parse_rule(str(rule)) == rule), without a
    trailing '.0'."""
    text = repr(_canonical(value))
    return text[:-2] if text.endswith('.0') else text


def _normalise_fields(rule) -> None:
    """Store every field of a frozen rule as its `_canonical` float (numbers only; others are left for the
    rule's own check to refuse)."""
    for field in dataclasses.fields(rule):
        value = getattr(rule, field.name)
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            object.__setattr__(rule, field.name, _canonical(value))


class GuidanceRule(Protocol):
    """How the main denoiser's output D1 and the (mixed) guide's D0 combine with weight w, per image:
    a pure function of its arguments and of the run's `state` (None at a run's first guided evaluation),
    returning D, in main's dtype and shape, and the state for the run's next guided evaluation."""

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float,
                state: Any = None) -> Tuple[torch.Tensor, Any]: ...


@dataclasses.dataclass(frozen=True)
class Lerp:
    """D = D0 + w (D1 − D0), computed as torch.lerp(D0, D1, w). No state."""

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, state=None):
        return guide.lerp(main, weight), None

    def __str__(self):
        return 'lerp'


@dataclasses.dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al., ICLR 2025): η scales the part of the update parallel to
    D1, β is the (reverse, β ≤ 0 in the paper) momentum, r caps the update's norm; β = 0 and r = 0 are off.

    The state of a run is the momentum buffer m (float64, shaped like the batch; None = zero, at the start
    of a run); without momentum the state stays None.
    """

    eta: float = 0.0
    momentum: float = 0.0
    threshold: float = 0.0

    def __post_init__(self):
        _normalise_fields(self)
        for key in ('eta', 'momentum', 'threshold'):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise RuleError(f'apg: {key} must be finite, got {value!r}')
        if self.threshold < 0:
            raise RuleError(f'apg: threshold must be >= 0 (0 = no cap), got {self.threshold:g}')

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, state=None):
        dims = _per_image(main)
        d1 = main.double()
        delta = d1 - guide.double()
        if self.momentum != 0:
            if state is not None:
                if state.shape != delta.shape:
                    raise RuleError(f'{self}: the momentum state is of a batch of shape {list(state.shape)}, '
                                    f'this evaluation of {list(delta.shape)}; start every run with state=None')
                delta = delta + self.momentum * state
            state = delta
        else:
            state = None
        if self.threshold > 0:
            norm = delta.square().sum(dims, keepdim=True).sqrt()
            delta = delta * (self.threshold / norm).clamp(max=1)  # r / 0 = inf: an update of zero stays zero
        energy = d1.square().sum(dims, keepdim=True)
        along = (delta * d1).sum(dims, keepdim=True) / energy.where(energy > 0, torch.ones_like(energy))
        parallel = along * d1
        update = (delta - parallel) + self.eta * parallel
        return (d1 + (weight - 1) * update).to(main.dtype), state

    def __str__(self):
        return f'apg:eta={_format(self.eta)},momentum={_format(self.momentum)},threshold={_format(self.threshold)}'


@dataclasses.dataclass(frozen=True)
class Rescale:
    """Guidance rescale (Lin et al., WACV 2024, sec. 3.4): the lerp result brought back to the standard
    deviation of D1, blended with φ. No state."""

    phi: float

    def __post_init__(self):
        _normalise_fields(self)
        if not (math.isfinite(self.phi) and 0 <= self.phi <= 1):
            raise RuleError(f'rescale: phi must lie in [0, 1], got {self.phi!r}')

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, state=None):
        dims = _per_image(main)
        guided = guide.lerp(main, weight)
        # The same number of elements on both sides, so the std's correction cancels in the ratio.
        std_main = main.std(dims, keepdim=True)
        std_guided = guided.std(dims, keepdim=True)
        ratio = std_main / std_guided.where(std_guided > 0, torch.ones_like(std_guided))
        ratio = ratio.where(std_guided > 0, torch.ones_like(ratio))
        return self.phi * (guided * ratio) + (1 - self.phi) * guided, None

    def __str__(self):
        return f'rescale:phi={_format(self.phi)}'


Rule = Union[Lerp, APG, Rescale]
RULES = {'lerp': (Lerp, ()), 'apg': (APG, ('eta', 'momentum', 'threshold')), 'rescale': (Rescale, ('phi',))}


def parse_rule(spec) -> Rule:
    """'lerp', 'apg[:eta=E,momentum=B,threshold=R]' (any subset; defaults 0) or 'rescale:phi=P' -> a rule.
    A rule object is returned as it is. Raises RuleError naming the spec."""
    if isinstance(spec, tuple(cls for cls, _ in RULES.values())):
        return spec
    text = str(spec).strip()
    name, _, args = text.partition(':')
    if name not in RULES:
        raise RuleError(f'unknown guidance rule {text!r}; expected one of {", ".join(RULES)} '
                        f"(e.g. 'apg:eta=0,momentum=-0.5,threshold=15' or 'rescale:phi=0.7')")
    cls, keys = RULES[name]
    values = {}
    for item in (part.strip() for part in args.split(',') if part.strip()):
        key, eq, raw = item.partition('=')
        key = key.strip()
        if key not in keys:
            allowed = ', '.join(keys) if keys else 'none'
            raise RuleError(f'guidance rule {text!r}: unknown key {key!r} (keys of {name}: {allowed})')
        if not eq:
            raise RuleError(f'guidance rule {text!r}: {key!r} needs a value ({key}=NUMBER)')
        if key in values:
            raise RuleError(f'guidance rule {text!r}: {key!r} given twice')
        try:
            values[key] = float(raw)
        except ValueError:
            raise RuleError(f'guidance rule {text!r}: {key}={raw.strip()!r} is not a number') from None
        if not math.isfinite(values[key]):
            raise RuleError(f'guidance rule {text!r}: {key} must be finite, got {raw.strip()}')
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [key for key in required if key not in values]
    if missing:
        raise RuleError(f'guidance rule {text!r}: {name} needs {", ".join(k + "=NUMBER" for k in missing)}')
    try:
        return cls(**values)
    except RuleError as e:
        raise RuleError(f'guidance rule {text!r}: {e}') from None
