"""Seeds to images: each seed's random stream, its class label, the batching over torchrun ranks, decoding.

`generate` is the pipeline of `generate_images.py` and `calculate_metrics.py gen`. Every image has its
own torch.Generator on the sampling device, seeded with seed mod 2³², from which come, in this order,
the initial noise, the class (for a conditional network) and the churn noise; so a seed gives the same
image whatever the batch size or the number of processes, and published seeds give published images.
Seeds may be any sequence with len() and indexing (a `range`, or `SeedRanges` for lists of ranges), so a
range of 10¹² seeds costs no memory before it is sampled.
"""

import bisect
import dataclasses
from typing import Iterator, Optional, Sequence, Union

import torch
import tqdm

from . import distributed
from .sampling import Guidance, HeunOptions, SamplingError, edm_schedule, heun_sampler

CLASS_RULES = ('random', 'balanced')


class SeedRanges(Sequence):
    """The concatenation of integer ranges, e.g. from '0-49999,60000-60009', without materialising it."""

    def __init__(self, ranges: Sequence[range]):
        self.ranges = [r for r in ranges if len(r)]
        self.starts, total = [], 0
        for r in self.ranges:
            self.starts.append(total)
            total += len(r)
        self.total = total

    def __len__(self):
        return self.total

    def __getitem__(self, position):
        if isinstance(position, slice):
            return [self[p] for p in range(*position.indices(self.total))]
        if position < 0:
            position += self.total
        if not 0 <= position < self.total:
            raise IndexError('seed position out of range')
        k = bisect.bisect_right(self.starts, position) - 1
        return self.ranges[k][position - self.starts[k]]

    def __iter__(self):
        for r in self.ranges:
            yield from r


def image_bytes(net, encoder=None) -> int:
    """Memory one image of a sampling batch takes at least (bytes): the sampler's float32 copies of the
    image (x, the denoised image, two slopes, the noise; x 8 for the guided evaluations), the network's
    four widest live activations at full resolution, and the decoded uint8 output."""
    res, channels = int(net.img_resolution), int(net.img_channels)
    width = int(getattr(net, 'init_kwargs', {}).get('model_channels', channels))
    out = 512 * 512 * 3 if channels == 4 else res * res * channels  # latents decode to 512x512 RGB
    return 4 * res * res * (8 * channels + 4 * width) + out


def batch_positions(count: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[range]:
    """The batches (as ranges of positions into the seed list) that `rank` generates, lazily.

    The positions 0..count−1 are cut into num_batches = max(⌈count / (batch_size · world_size)⌉, 1) ·
    world_size consecutive chunks whose sizes differ by at most one, the longer ones first; rank r takes
    chunks r, r + world_size, ... (the published tool's split, so that its seeds keep their batch mates).
    Every rank gets the same number of chunks; some may be empty.
    """
    if batch_size < 1:
        raise SamplingError(f'batch size must be at least 1, got {batch_size}')
    num_batches = max(-(-count // (batch_size * world_size)), 1) * world_size
    size, longer = divmod(count, num_batches)
    for chunk in range(rank, num_batches, world_size):
        start = chunk * size + min(chunk, longer)
        yield range(start, start + size + (chunk < longer))


def _positions_of_rank(count, batch_size, rank, world_size) -> int:
    """How many positions `batch_positions` gives this rank, without walking the chunks."""
    num_batches = max(-(-count // (batch_size * world_size)), 1) * world_size
    size, longer = divmod(count, num_batches)
    return len(range(rank, num_batches, world_size)) * size + len(range(rank, longer, world_size))


def rgb_decode(x: torch.Tensor) -> torch.Tensor:
    """Pixels scaled to [−1, 1] -> uint8 by truncation: uint8(clip(x · 127.5 + 128, 0, 255))."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclasses.dataclass
class GeneratedBatch:
    """One batch yielded by `generate`."""

    seeds: list                      # the seeds of this batch, in order
    positions: range                 # their positions in the seed list
    images: Optional[torch.Tensor]   # uint8 [n, C, H, W] on the sampling device; None for a skipped batch
    labels: Optional[torch.Tensor]   # int64 [n] class per image, or None for an unconditional network


def _class_rule(classes, label_dim):
    """Check the class choice against the network; returns it normalised ('random', 'balanced' or an int)."""
    if classes in CLASS_RULES:
        if classes == 'balanced' and label_dim == 0:
            raise SamplingError('balanced labels need a conditional network; this one has label_dim 0')
        return classes
    if isinstance(classes, bool) or not isinstance(classes, int):
        raise SamplingError(f'classes must be "random", "balanced" or a class index, got {classes!r}')
    if label_dim == 0:
        raise SamplingError(f'class {classes} requested but the network is unconditional (label_dim 0)')
    if not 0 <= classes < label_dim:
        raise SamplingError(f'class {classes} out of range: the network has {label_dim} classes (0..{label_dim - 1})')
    return classes


def _check_seeds(seeds):
    ranges = seeds.ranges if isinstance(seeds, SeedRanges) else [seeds] if isinstance(seeds, range) else None
    if ranges is not None:  # lazy: only the ends of each range
        negative = any(len(r) and min(r[0], r[-1]) < 0 for r in ranges)
    else:
        negative = any(int(s) != s or s < 0 for s in seeds)
    if negative:
        raise SamplingError('seeds must be non-negative integers')


def _device_of(net, device):
    if device is not None:
        return torch.device(device)
    try:
        return next(net.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device('cpu')


@dataclasses.dataclass
class _Plan:
    """Everything `generate` checked before the first batch."""

    net: object
    seeds: Sequence[int]
    denoiser: object
    guided_steps: Optional[list]
    sigmas: torch.Tensor
    options: HeunOptions
    classes: Union[str, int]
    label_dim: int
    shape: list
    encoder: object
    device: torch.device

    def streams(self, positions):
        """Per-seed generators, their initial noise and classes (drawn in the published order)."""
        seeds = [self.seeds[p] for p in positions]
        generators = [torch.Generator(self.device).manual_seed(s % (1 << 32)) for s in seeds]
        noise = torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in generators])
        if self.label_dim == 0:
            return seeds, generators, noise, None
        drawn = torch.stack([torch.randint(self.label_dim, size=[], generator=g, device=self.device)
                             for g in generators])  # drawn in every case, so the churn noise stays the same
        if self.classes == 'balanced':  # position p gets class p mod label_dim: counts differ by at most one
            drawn = torch.tensor([p % self.label_dim for p in positions], device=self.device)
        elif self.classes != 'random':
            drawn = torch.full_like(drawn, self.classes)
        return seeds, generators, noise, drawn

    def sample(self, positions) -> GeneratedBatch:
        seeds, generators, noise, classes = self.streams(positions)
        onehot = None if classes is None else torch.nn.functional.one_hot(classes, self.label_dim).to(torch.float32)
        x = heun_sampler(self.denoiser, noise, self.sigmas, onehot, self.options, guided_steps=self.guided_steps,
                         generators=generators)
        if not torch.isfinite(x).all():
            raise SamplingError(f'the sampler produced non-finite values for seeds {seeds[0]}..{seeds[-1]} '
                                f'(check the networks and the schedule); nothing of this batch is written')
        images = self.encoder.decode(x) if self.encoder is not None else rgb_decode(x)
        return GeneratedBatch(seeds=seeds, positions=positions, images=images, labels=classes)


def generate(net, seeds: Sequence[int], *, guidance: Guidance = Guidance(), sigmas: Optional[torch.Tensor] = None,
             options: HeunOptions = HeunOptions(), classes: Union[str, int] = 'random', encoder=None,
             batch_size: int = 32, device=None, rank: Optional[int] = None, world_size: Optional[int] = None,
             skip=None, progress: bool = False) -> Iterator[GeneratedBatch]:
    """The images of `seeds`, one batch at a time, as `generate_images.py` writes them.

    net:        the main denoiser (e.g. from `edm2.load_snapshot`), on `device`, in eval mode; needs
                `img_channels`, `img_resolution` and `label_dim`.
    seeds:      non-negative ints (any sequence with len() and indexing; ranges stay lazy).
    guidance:   guides, weight, shares and interval (`edm2.sampling.Guidance`); default none.
    sigmas:     the schedule (default `edm_schedule(dtype=options.dtype)`); options: `HeunOptions`.
    classes:    'random' (drawn from each seed's generator, the published rule), 'balanced' (the image at
                position p of `seeds` gets class p mod label_dim, so every class appears ⌊n/label_dim⌋ or
                ⌈n/label_dim⌉ times whatever the batching, ranks or skipping) or one class index for all.
    encoder:    has decode(x) -> uint8 NCHW (its init(device) is called first when present); None decodes
                RGB pixels (`rgb_decode`).
    batch_size, rank, world_size: the split of `batch_positions`; rank and world size default to torchrun's.
    skip:       optional predicate seed -> bool; a batch all of whose seeds satisfy it is not sampled and
                is yielded with images None (its labels are still given).
    progress:   a tqdm bar on rank 0.

    Every setting is checked here, before the first batch (SamplingError); the iterator raises
    SamplingError if the sampler produces non-finite values, before that batch is yielded.
    """
    device = _device_of(net, device)
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    _check_seeds(seeds)
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    sigmas = edm_schedule(dtype=options.dtype) if sigmas is None else sigmas.to('cpu', options.dtype)
    plan = _Plan(net=net, seeds=seeds, denoiser=guidance.denoiser(net, options.dtype),
                 guided_steps=guidance.steps(sigmas), sigmas=sigmas, options=options,
                 classes=_class_rule(classes, label_dim), label_dim=label_dim,
                 shape=[int(net.img_channels), int(net.img_resolution), int(net.img_resolution)],
                 encoder=encoder, device=device)
    batches = batch_positions(len(seeds), batch_size, rank, world_size)
    if encoder is not None and hasattr(encoder, 'init'):
        encoder.init(device)
    total = _positions_of_rank(len(seeds), batch_size, rank, world_size)
    return _run(plan, batches, skip, tqdm.tqdm(total=total, unit='img', desc='Generating')
                if progress and rank == 0 else None)


def _run(plan, batches, skip, bar):
    try:
        for positions in batches:
            if not positions:
                continue
            if skip is not None and all(skip(plan.seeds[p]) for p in positions):
                seeds, classes = [plan.seeds[p] for p in positions], None
                if plan.label_dim:  # the labels of skipped images, for --labels-out
                    seeds, _, _, classes = plan.streams(positions)
                yield GeneratedBatch(seeds=seeds, positions=positions, images=None, labels=classes)
            else:
                yield plan.sample(positions)
            if bar is not None:
                bar.update(len(positions))
    finally:
        if bar is not None:
            bar.close()
