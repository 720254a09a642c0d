"""Denoiser adapters: a diffusers DDPM-family or rectified-flow network as a denoiser D(x; σ, c) called like
this project's networks, `net(x, sigma, cond)`.

DDPM family (discrete timesteps t with cumulative product ᾱ_t; DDPM, Ho et al. 2020; DDIM, Song et al. 2021):
the model's x_t = sqrt(ᾱ_t) (x0 + σ_t ε) with σ_t = sqrt((1 − ᾱ_t) / ᾱ_t), so the EDM coordinates of
Karras et al. 2022 (sec. 3, "Elucidating the design space", their eq. 1 with s(t) = 1/sqrt(1 + σ²)) are
x = x_t / sqrt(ᾱ_t). The model is fed x / sqrt(1 + σ²) and the timestep t whose σ_t equals σ (t
interpolated linearly in log σ over the table, exact at the table's points), and

    ε-prediction:       D = x − σ ε
    v-prediction:       D = x / (1 + σ²) − σ v / sqrt(1 + σ²)
    sample-prediction:  D = output

(learned-variance output channels are dropped). A DDIM step with η = 0 between two table levels is then
exactly one Euler step of dx/dσ = (x − D)/σ between the same σ's.

Rectified flow (x_t = (1 − t) x0 + t ε, the network predicts u = ε − x0; Liu et al. 2023, "Flow straight and
fast"; SD3, Esser et al. 2024): σ = t in the model's own coordinates and D = x − t u, so that the Euler step
x + (t' − t)(x − D)/t is the flow-matching scheduler's step x + (t' − t) u.

Text conditioning is a `TextCond` (the prompt embeddings, and the pooled ones of SD3); `UncondGuide` is the
guide of classifier-free guidance: the main network with a fixed (empty or negative) prompt embedding.
"""

import dataclasses
import math
from typing import Callable, Optional

import torch


@dataclasses.dataclass
class TextCond:
    """The conditioning of a batch: `embeds` [n, L, C] and, for SD3, `pooled` [n, P]."""

    embeds: torch.Tensor
    pooled: Optional[torch.Tensor] = None

    def __len__(self):
        return self.embeds.shape[0]

    def take(self, index) -> 'TextCond':
        """The rows `index` (a list or tensor of row numbers)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.embeds.device)
        return TextCond(self.embeds[index], None if self.pooled is None else self.pooled[index.to(self.pooled.device)])

    def expand(self, n: int) -> 'TextCond':
        """A one-row conditioning repeated n times (no copy)."""
        return TextCond(self.embeds.expand(n, *self.embeds.shape[1:]),
                        None if self.pooled is None else self.pooled.expand(n, *self.pooled.shape[1:]))

    def to(self, device=None, dtype=None) -> 'TextCond':
        return TextCond(self.embeds.to(device, dtype), None if self.pooled is None else self.pooled.to(device, dtype))


class ExternalDenoiser:
    """What both families share. `call(model_input, timestep, cond)` runs the wrapped network and returns its
    raw output; `label_dim` is the width of the text conditioning (nonzero, so that a guide of the same
    kind is given the prompt embeddings by `edm2.sampling.GuidedDenoiser`; an `UncondGuide` has 0)."""

    kind = ''

    def __init__(self, call: Callable, img_channels: int, img_resolution: int, label_dim: int, dtype=torch.float32,
                 name: str = '', scheduler=None, encoder=None):
        self.call, self.img_channels, self.img_resolution = call, int(img_channels), int(img_resolution)
        self.label_dim, self.dtype, self.name, self.scheduler = int(label_dim), dtype, name, scheduler
        self.encoder = encoder  # has encode(list_of_prompts) -> TextCond and release()

    def encode_prompt(self, prompts) -> TextCond:
        """The conditioning of `prompts` (a list of strings) by the model's own text encoders, as its diffusers
        pipeline computes it; the encoders are loaded on first use (free them with `release_text_encoder`)."""
        if self.encoder is None:
            raise ValueError(f'{self.name}: this model was loaded without its text encoders')
        return self.encoder.encode([str(p) for p in prompts])

    def release_text_encoder(self) -> None:
        if self.encoder is not None:
            self.encoder.release()

    def start_scale(self, sigma_max: float) -> float:
        """The factor the sampler's x_0 = noise · σ_0 needs so that the first sample is the model's x_T = ε."""
        raise NotImplementedError

    def __repr__(self):
        return f'{type(self).__name__}({self.name})'


class DDPMDenoiser(ExternalDenoiser):
    """A discrete-time model with cumulative product ᾱ_t (`alphas_cumprod`, one entry per training timestep)
    predicting 'epsilon', 'v_prediction' or 'sample'."""

    kind = 'ddpm'

    def __init__(self, call, alphas_cumprod: torch.Tensor, prediction: str, **kwargs):
        super().__init__(call, **kwargs)
        if prediction not in ('epsilon', 'v_prediction', 'sample'):
            raise ValueError(f'unknown prediction type {prediction!r}')
        self.prediction = prediction
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.sigma_table = ((1 - abar) / abar).sqrt()  # σ_t, increasing in t
        if not (torch.isfinite(self.sigma_table).all() and (self.sigma_table > 0).all()
                and (self.sigma_table[1:] > self.sigma_table[:-1]).all()):
            raise ValueError(f'{self.name}: the scheduler\'s ᾱ_t do not give finite, increasing noise levels')
        self.log_table = self.sigma_table.log()
        self.sigma_min, self.sigma_max = float(self.sigma_table[0]), float(self.sigma_table[-1])

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional) timestep t with σ_t = σ: linear in log σ between table points, clamped to the table,
        and exactly the integer t within 10⁻³ of a table point (the σ's of a float32 schedule)."""
        logs = sigma.detach().to('cpu', torch.float64).clamp(self.sigma_min, self.sigma_max).log().reshape(-1)
        upper = torch.searchsorted(self.log_table, logs).clamp(1, len(self.log_table) - 1)
        lo, hi = self.log_table[upper - 1], self.log_table[upper]
        t = (upper - 1).to(torch.float64) + (logs - lo) / (hi - lo)
        snapped = t.round()
        return torch.where((t - snapped).abs() < 1e-3, snapped, t)

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        t = self.timestep(sigma)
        t = (t.expand(x.shape[0]) if t.numel() == 1 else t).to(x.device)
        s = sigma.reshape(-1, *[1] * (x.ndim - 1)).to(torch.float32)
        scale = (1 + s ** 2).rsqrt()
        out = self.call((x.to(torch.float32) * scale).to(self.dtype), t, cond).to(torch.float32)
        out = out[:, :x.shape[1]]  # learned-variance channels dropped
        x = x.to(torch.float32)
        if self.prediction == 'epsilon':
            return x - s * out
        if self.prediction == 'v_prediction':
            return x * scale ** 2 - s * scale * out
        return out

    def start_scale(self, sigma_max: float) -> float:
        # x_T = ε in the model's space is ε · sqrt(1 + σ²) in EDM coordinates.
        return math.sqrt(1 + float(sigma_max) ** 2) / float(sigma_max)

    def model_schedule(self, num_steps: int) -> torch.Tensor:
        """The levels σ(t_i) of the timesteps the model's scheduler takes for `num_steps` steps (its own
        timestep spacing), then 0: with the Euler solver this is its DDIM run (η = 0)."""
        self.scheduler.set_timesteps(int(num_steps))
        levels = self.sigma_table[self.scheduler.timesteps.to('cpu', torch.long)]
        return torch.cat([levels, levels.new_zeros(1)]).to(torch.float32)


class FlowDenoiser(ExternalDenoiser):
    """A rectified-flow model predicting u = ε − x0, with σ = t ∈ (0, 1]; the network is given the timestep
    σ · num_train_timesteps."""

    kind = 'flow'

    def __init__(self, call, num_train_timesteps: int, sigma_min: float, sigma_max: float, **kwargs):
        super().__init__(call, **kwargs)
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.mu = None  # the dynamic shift of a scheduler with use_dynamic_shifting

    def __call__(self, x: torch.Tensor, sigma, cond=None) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device)
        t = sigma.reshape(-1) * self.num_train_timesteps
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        u = self.call(x.to(self.dtype), t, cond).to(torch.float32)
        return x.to(torch.float32) - sigma.reshape(-1, *[1] * (x.ndim - 1)) * u

    def start_scale(self, sigma_max: float) -> float:
        return 1 / float(sigma_max)  # the run starts from x = ε, as the pipeline's does

    def model_schedule(self, num_steps: int) -> torch.Tensor:
        """The scheduler's own σ's for `num_steps` steps (its shift), ending with 0: with the Euler solver this
        is its FlowMatchEulerDiscreteScheduler run."""
        kwargs = {'mu': self.mu} if self.mu is not None else {}
        self.scheduler.set_timesteps(int(num_steps), **kwargs)
        sigmas = self.scheduler.sigmas.to('cpu', torch.float32)
        if sigmas[-1] != 0:
            sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
        return sigmas


class UncondGuide:
    """The guide of classifier-free guidance: `net` with a fixed one-row conditioning (the empty or negative
    prompt), whatever cond it is given. label_dim 0: `GuidedDenoiser` gives it no labels."""

    label_dim = 0

    def __init__(self, net: ExternalDenoiser, negative: TextCond):
        self.net, self.negative = net, negative
        self.img_channels, self.img_resolution = net.img_channels, net.img_resolution

    def __call__(self, x, sigma, cond=None):
        return self.net(x, sigma, self.negative.expand(x.shape[0]))
