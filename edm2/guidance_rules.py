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
inverse of `parse_rule`: 'lerp', 'apg:eta=0,momentum=-0.5,threshold=15', 'rescale:phi=0.7'. A rule with
state across evaluations (APG's momentum) keeps it in the object returned by `new_memory()`, which the
caller creates at the start of every batch and passes to each guided evaluation in order.
"""

import dataclasses
import math
from typing import Optional, Union

import torch

from .errors import EDM2Error


class RuleError(EDM2Error):
    """A guidance rule spec that cannot be used; the message is one line naming the value."""


def _per_image(x: torch.Tensor) -> list:
    """The dimensions of one image (all but the batch dimension)."""
    return list(range(1, x.ndim))


def _format(value: float) -> str:
    """The shortest text that reads back as the same float (so parse_rule(str(rule)) == rule), without a
    trailing '.0'."""
    text = repr(float(value))
    return text[:-2] if text.endswith('.0') else text


@dataclasses.dataclass(frozen=True)
class Lerp:
    """D = D0 + w (D1 − D0), computed as torch.lerp(D0, D1, w)."""

    def new_memory(self):
        return None

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, memory=None) -> torch.Tensor:
        return guide.lerp(main, weight)

    def __str__(self):
        return 'lerp'


@dataclasses.dataclass
class _Momentum:
    """APG's running buffer m, one entry per image of the batch; None until the first guided evaluation."""

    buffer: Optional[torch.Tensor] = None


@dataclasses.dataclass(frozen=True)
class APG:
    """Adaptive projected guidance (Sadat et al., ICLR 2025): η scales the part of the update parallel to
    D1, β is the (reverse, β ≤ 0 in the paper) momentum, r caps the update's norm; β = 0 and r = 0 are off."""

    eta: float = 0.0
    momentum: float = 0.0
    threshold: float = 0.0

    def __post_init__(self):
        for key in ('eta', 'momentum', 'threshold'):
            value = getattr(self, key)
            if not math.isfinite(value):
                raise RuleError(f'apg: {key} must be finite, got {value!r}')
        if self.threshold < 0:
            raise RuleError(f'apg: threshold must be >= 0 (0 = no cap), got {self.threshold:g}')

    def new_memory(self):
        return _Momentum()

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, memory=None) -> torch.Tensor:
        dims = _per_image(main)
        d1 = main.double()
        delta = d1 - guide.double()
        if self.momentum != 0:
            if memory is None:
                raise RuleError('apg with momentum needs the memory of new_memory() at every evaluation')
            if memory.buffer is not None:
                delta = delta + self.momentum * memory.buffer
            memory.buffer = delta
        if self.threshold > 0:
            norm = delta.square().sum(dims, keepdim=True).sqrt()
            delta = delta * (self.threshold / norm).clamp(max=1)  # r / 0 = inf: an update of zero stays zero
        energy = d1.square().sum(dims, keepdim=True)
        along = (delta * d1).sum(dims, keepdim=True) / energy.where(energy > 0, torch.ones_like(energy))
        parallel = along * d1
        update = (delta - parallel) + self.eta * parallel
        return (d1 + (weight - 1) * update).to(main.dtype)

    def __str__(self):
        return f'apg:eta={_format(self.eta)},momentum={_format(self.momentum)},threshold={_format(self.threshold)}'


@dataclasses.dataclass(frozen=True)
class Rescale:
    """Guidance rescale (Lin et al., WACV 2024, sec. 3.4): the lerp result brought back to the standard
    deviation of D1, blended with φ."""

    phi: float

    def __post_init__(self):
        if not (math.isfinite(self.phi) and 0 <= self.phi <= 1):
            raise RuleError(f'rescale: phi must lie in [0, 1], got {self.phi!r}')

    def new_memory(self):
        return None

    def combine(self, main: torch.Tensor, guide: torch.Tensor, weight: float, memory=None) -> torch.Tensor:
        dims = _per_image(main)
        guided = guide.lerp(main, weight)
        # The same number of elements on both sides, so the std's correction cancels in the ratio.
        std_main = main.std(dims, keepdim=True)
        std_guided = guided.std(dims, keepdim=True)
        ratio = std_main / std_guided.where(std_guided > 0, torch.ones_like(std_guided))
        ratio = ratio.where(std_guided > 0, torch.ones_like(ratio))
        return self.phi * (guided * ratio) + (1 - self.phi) * guided

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
