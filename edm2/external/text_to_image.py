"""Text-to-image generation with a diffusers model: prompts × seeds to images, sampled by this project's EDM
sampler (Heun or Euler, any schedule) with any of its guidance (guides, shares, rules, interval).

Image k of a run is the pair (prompt p, seed s), numbered prompt-major over `prompts` × `seeds`; its initial
noise ε comes from torch.Generator(device).manual_seed(s mod 2³²).randn([C, H, W]), as generate_images.py
draws it for EDM2 networks (same seed, same ε, whatever the prompt, batch or process), and the run starts at
the model's x_T = ε (`ExternalDenoiser.start_scale`). After sampling, a latent model's x is decoded by its
VAE; IF's pixels continue through its super-resolution stages (CFG, diffusers' own pipelines). Pixels in
[−1, 1] are written as uint8(clip(x · 127.5 + 128, 0, 255)).
"""

import dataclasses
from typing import Iterator, Optional, Sequence

import torch
import tqdm

from ..generation import batch_positions, rgb_decode
from ..sampling import Guidance, HeunOptions, SamplingError, heun_sampler
from .denoisers import ExternalDenoiser, TextCond


@dataclasses.dataclass
class TextBatch:
    """One batch of images: `keys` [(prompt index, seed)], `images` uint8 [n, 3, H, W] (None: all skipped)."""

    keys: list
    images: Optional[torch.Tensor]


@dataclasses.dataclass
class Prompts:
    """The prompts of a run and their conditioning (one row per prompt), plus the negative (empty) prompt's."""

    texts: list
    cond: TextCond
    negative_text: str
    negative: TextCond


def encode_prompts(net: ExternalDenoiser, texts: Sequence[str], negative: str = '', device=None) -> Prompts:
    """Encode every prompt once (and the negative prompt), then free the text encoders."""
    texts = [str(t) for t in texts]
    cond = net.encode_prompt(texts + [negative])
    net.release_text_encoder()
    cond = cond.to(device)
    n = len(texts)
    return Prompts(texts, cond.take(list(range(n))), negative, cond.take([n]))


def job(position: int, num_seeds: int, seeds) -> tuple:
    """(prompt index, seed) of image `position` of the prompt-major product."""
    p, k = divmod(position, num_seeds)
    return p, int(seeds[k])


class TextSampler:
    """Samples the images of (prompt index, seed) keys: x at σ = 0 in the model's space (latents or pixels)."""

    def __init__(self, net: ExternalDenoiser, prompts: Prompts, *, guidance: Guidance = Guidance(),
                 sigmas: torch.Tensor, options: HeunOptions = HeunOptions(), device=None):
        self.net, self.prompts, self.options = net, prompts, options
        self.device = torch.device(device if device is not None else 'cpu')
        self.sigmas = sigmas.to('cpu', options.dtype)
        self.denoiser = guidance.denoiser(net, options.dtype)
        self.guided_steps = guidance.steps(self.sigmas)
        self.scale = net.start_scale(float(self.sigmas[0]))
        self.shape = [net.img_channels, net.img_resolution, net.img_resolution]

    def __call__(self, keys) -> tuple:
        """(x, the per-image generators, the batch's conditioning)."""
        generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for _, s in keys]
        noise = torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in generators])
        cond = self.prompts.cond.take([p for p, _ in keys])
        x = heun_sampler(self.denoiser, noise * self.scale, self.sigmas, cond, self.options,
                         guided_steps=self.guided_steps, generators=generators)
        if not torch.isfinite(x).all():
            raise SamplingError(f'the sampler produced non-finite values for {keys[0]}..{keys[-1]} '
                                '(prompt, seed); nothing of this batch is written')
        return x, generators, cond


def generate_text_images(sampler: TextSampler, seeds: Sequence[int], *, decode=None, stages=(), batch_size: int = 8,
                         rank: int = 0, world_size: int = 1, skip=None, progress: bool = False) -> Iterator[TextBatch]:
    """The images of the sampler's prompts × `seeds`, one batch at a time.

    decode: latents -> pixels in [−1, 1] (a `LatentDecoder.pixels`), or None for a pixel model.
    stages: super-resolution stages called as stage(pixels, prompt texts, cond, negative cond, negative text,
            generators) -> pixels (`edm2.external.loading.SuperResolution`).
    skip:   predicate (prompt index, seed) -> bool; a batch all of whose images satisfy it is not sampled.
    """
    prompts = sampler.prompts
    total = len(prompts.texts) * len(seeds)
    bar = tqdm.tqdm(total=total, unit='img', desc='Generating') if progress and rank == 0 else None
    try:
        for positions in batch_positions(total, batch_size, rank, world_size):
            if not positions:
                continue
            keys = [job(p, len(seeds), seeds) for p in positions]
            if skip is not None and all(skip(*key) for key in keys):
                yield TextBatch(keys, None)
            else:
                x, generators, cond = sampler(keys)
                pixels = decode(x) if decode is not None else x.to(torch.float32)
                for stage in stages:
                    pixels = stage(pixels, [prompts.texts[p] for p, _ in keys], cond, prompts.negative,
                                   prompts.negative_text, generators)
                yield TextBatch(keys, rgb_decode(pixels))
            if bar is not None:
                bar.update(len(positions))
    finally:
        if bar is not None:
            bar.close()
