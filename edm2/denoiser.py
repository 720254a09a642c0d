"""The denoiser protocols: what the samplers call, D(x; σ, c), and its guided form with an explicit per-run state.

`Denoiser` is the plain contract, met by `edm2.networks.Precond`, a `GuidedDenoiser`, a bound self guide
or any function:

    D(x, sigma, labels) -> tensor shaped like x

- x:      [n, C, H, W], a floating-point tensor (the sampler's precision, `HeunOptions.dtype`);
- sigma:  the noise level, a 0-dim tensor on x's device (one level for the whole batch; `Precond` also
          takes one per image, [n]);
- labels: [n, label_dim] one-hot class rows, or None for an unconditional call;
- result: D(x; σ, c), the denoised estimate, shaped like x, in any floating dtype (the sampler's
          arithmetic promotes it with x's). A denoiser keeps no state between calls: two calls with the
          same arguments give the same result, whatever was called before and on whichever thread.

`StatefulDenoiser` is what `edm2.sampling.heun_sampler` calls instead when a denoiser offers it (a
`GuidedDenoiser` does): one evaluation of a sampler run, given whether the step is guided and the state
of the run so far (None at the first evaluation of every run), returning the denoised estimate and the
state to pass to the run's next evaluation. A state (e.g. the momentum of APG, `edm2.guidance_rules`)
lives in the sampler's run only, never in the denoiser: a run cannot see another run's state.
"""

from typing import Any, Optional, Protocol, Tuple, runtime_checkable

import torch


class Denoiser(Protocol):
    """D(x, sigma, labels) -> D(x; σ, c) shaped like x; no state between calls (see the module docstring)."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor,
                 labels: Optional[torch.Tensor] = None) -> torch.Tensor: ...


@runtime_checkable
class StatefulDenoiser(Protocol):
    """A denoiser whose evaluations within one sampler run share a state that the sampler carries:
    `evaluate(x, sigma, labels, guided, state) -> (D, new_state)`, with state None at the start of a run."""

    def evaluate(self, x: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor], guided: bool,
                 state: Any) -> Tuple[torch.Tensor, Any]: ...
