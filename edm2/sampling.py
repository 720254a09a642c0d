"""EDM sampling with guidance (SPEC section 5).

Three layers, each usable on its own:

- `time_steps`: the EDM noise-level schedule.
- `edm_sampler`: the stochastic Heun sampler of EDM (Karras et al. 2022, Algorithm 2) over a batch of
  initial noise, with the guidance variants of the EDM2/autoguidance release and their extensions:
  one guide (autoguidance or classifier-free guidance), a guidance interval (Kynkaenniemi et al. 2024)
  and several guides at once.
- `generate`: the seed -> image pipeline of `generate_images.py` (per-image random generators, class
  choice, splitting of seeds over torchrun ranks, decoding), as an iterator over batches; the metrics
  command `calculate_metrics.py gen` uses it too.

A "denoiser" here is anything called as `net(x, sigma, class_labels)` that returns D(x; sigma, c) with x's
shape, such as `edm2.networks.Precond`. Networks only need the attributes `img_channels`,
`img_resolution` and `label_dim` where shapes are checked or noise is drawn (`generate`,
`check_guides`).
"""

import dataclasses
import math
from typing import Iterator, Optional, Sequence

import torch

from edm2 import distributed


class SamplingError(ValueError):
    """Invalid sampling or guidance settings; the message is a single line meant for users."""


def time_steps(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None, dtype=torch.float64):
    """The EDM noise levels sigma_0 > ... > sigma_{N-1} = sigma_min, followed by sigma_N = 0 (N+1 values).

    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho  (EDM eq. 5).
    """
    if num_steps < 1:
        raise ValueError(f'num_steps must be at least 1, got {num_steps}')
    i = torch.arange(num_steps, dtype=dtype, device=device)
    frac = i / max(num_steps - 1, 1)
    t = (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros_like(t[:1])])


# ----------------------------------------------------------------------------------------------------
# Guidance.

def _as_guides(gnets) -> list:
    if gnets is None:
        return []
    if isinstance(gnets, (list, tuple)):
        return [g for g in gnets]
    return [gnets]  # a single network


def guide_weights_for(num_guides: int, guide_weights=None) -> list:
    """The mixing weights a_k of several guides: given ones checked (>= 0, summing to 1), else equal."""
    if guide_weights is None:
        return [1.0 / num_guides] * num_guides if num_guides else []
    weights = [float(a) for a in guide_weights]
    if len(weights) != num_guides:
        raise SamplingError(f'{len(weights)} guide weights given for {num_guides} guiding network(s)')
    if any(not math.isfinite(a) or a < 0 for a in weights):
        raise SamplingError(f'guide weights must be finite and non-negative, got {weights}')
    if abs(sum(weights) - 1) > 1e-6:
        raise SamplingError(f'guide weights must sum to 1, got {weights} (sum {sum(weights):g})')
    return weights


def check_interval(guidance_interval):
    """(sigma_lo, sigma_hi) as floats with 0 <= lo <= hi (hi may be inf), or None for 'all sigma'."""
    if guidance_interval is None:
        return None
    try:
        lo, hi = (float(v) for v in guidance_interval)
    except (TypeError, ValueError):
        raise SamplingError(f'guidance interval must be two numbers LO,HI, got {guidance_interval!r}') from None
    if math.isnan(lo) or math.isnan(hi) or lo < 0 or hi < lo:
        raise SamplingError(f'guidance interval must satisfy 0 <= LO <= HI, got ({lo:g}, {hi:g}]')
    return lo, hi


def check_guides(net, gnets) -> None:
    """Raise SamplingError unless every guide matches the main network's image shape and labels.

    A guide must produce images of the same shape (channels, resolution) and either take the same class
    labels as the main network or none at all (label_dim 0: an unconditional guide, as in
    classifier-free guidance with a separately trained unconditional network).
    """
    for k, gnet in enumerate(_as_guides(gnets)):
        name = f'guiding network {k + 1}'
        for attr in ('img_channels', 'img_resolution'):
            a, b = getattr(net, attr, None), getattr(gnet, attr, None)
            if a != b:
                raise SamplingError(f'{name} has {attr}={b} but the main network has {attr}={a}')
        a, b = getattr(net, 'label_dim', 0), getattr(gnet, 'label_dim', 0)
        if b not in (0, a):
            raise SamplingError(f'{name} has label_dim={b}; expected {a} (same as the main network) or 0')


class GuidedDenoiser:
    """D(x; sigma, c) of the main network, guided by zero or more guiding networks (SPEC section 5).

    - No guide, or `guidance == 1`: D = D_1 (the main network alone; guides are never evaluated).
    - One guide: D = D_0 + w (D_1 - D_0), computed as D_0.lerp(D_1, w).
    - K guides with weights a_k >= 0, sum a_k = 1 (autoguidance paper, DeepFloyd experiment):
      D = D_1 + (w - 1) sum_k a_k (D_1 - D_0k). Because the a_k sum to 1 this equals one-guide guidance
      with the mixed guide sum_k a_k D_0k, which is how it is computed; guides with a_k = 0 are not
      evaluated, so weights (1, 0) give exactly the first guide alone.
    - `guidance_interval=(lo, hi)`: the guided formula applies only to evaluations with lo < sigma <= hi
      (Kynkaenniemi et al. 2024); elsewhere D = D_1 and no guide is evaluated.

    Conditional guides receive the class labels; unconditional guides (label_dim 0) receive None.
    Outputs are cast to `dtype`. `num_evals` counts network evaluations: [main, guide_1, ..., guide_K]
    (one per call on a batch).
    """

    def __init__(self, net, gnets=(), guidance=1.0, guide_weights=None, guidance_interval=None,
                 dtype=torch.float32):
        self.net = net
        self.gnets = _as_guides(gnets)
        self.guidance = float(guidance)
        if not math.isfinite(self.guidance):
            raise SamplingError(f'guidance weight must be finite, got {guidance}')
        if self.guidance != 1 and not self.gnets:
            raise SamplingError(f'guidance {self.guidance:g} needs at least one guiding network (gnet)')
        check_guides(net, self.gnets)
        self.weights = guide_weights_for(len(self.gnets), guide_weights)
        self.interval = check_interval(guidance_interval)
        self.dtype = dtype
        self.num_evals = [0] * (1 + len(self.gnets))

    def guided_at(self, sigma: float) -> bool:
        """Whether an evaluation at noise level `sigma` uses the guides."""
        if self.guidance == 1 or not self.gnets:
            return False
        if self.interval is None:
            return True
        lo, hi = self.interval
        return lo < sigma <= hi

    def __call__(self, x, sigma, labels=None, sigma_value=None):
        """D(x; sigma, labels). `sigma`: a 0-dim tensor (ideally on x's device) or a number; `sigma_value`,
        its value as a Python float, spares a device sync when sigma lives on a GPU."""
        guided = self.guided_at(float(sigma) if sigma_value is None else sigma_value)
        sigma = torch.as_tensor(sigma, device=x.device)
        d1 = self._eval(0, self.net, x, sigma, labels)
        if not guided:
            return d1
        d0 = None
        for k, (gnet, a) in enumerate(zip(self.gnets, self.weights)):
            if a == 0:
                continue
            glabels = labels if getattr(gnet, 'label_dim', 0) else None
            d = self._eval(k + 1, gnet, x, sigma, glabels)
            term = d if a == 1 else d * a
            d0 = term if d0 is None else d0 + term
        return d0.lerp(d1, self.guidance)

    def _eval(self, slot, net, x, sigma, labels):
        self.num_evals[slot] += 1
        return net(x, sigma, labels).to(self.dtype)


# ----------------------------------------------------------------------------------------------------
# The sampler.

def _per_image_randn(generators, like):
    """Standard normal noise shaped like `like`, image i drawn from generators[i] (SPEC section 5)."""
    return torch.stack([torch.randn(like.shape[1:], generator=g, device=like.device, dtype=torch.float32)
                        for g in generators]).to(like.dtype)


@torch.no_grad()
def edm_sampler(net, noise, labels=None, *, gnets=(), guidance=1.0, guide_weights=None,
                guidance_interval=None, num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0,
                S_churn=0.0, S_min=0.0, S_max=float('inf'), S_noise=1.0, generators=None,
                dtype=torch.float32, denoiser=None):
    """Sample a batch with EDM's stochastic Heun sampler (SPEC section 5); returns x at sigma = 0 in `dtype`.

    net: the main denoiser D_1, called as net(x, sigma, labels) (e.g. `edm2.networks.Precond`).
    noise: [N, C, H, W] standard normal initial noise; x_0 = noise * sigma_0.
    labels: [N, label_dim] one-hot class labels for a conditional net, or None.
    gnets, guidance, guide_weights, guidance_interval: see `GuidedDenoiser` (one network or a sequence;
        guidance w = 1 never evaluates a guide; interval (lo, hi] in sigma).
    num_steps, sigma_min, sigma_max, rho: the schedule of `time_steps` (N steps, 2N - 1 evaluations of
        the main net per image).
    S_churn, S_min, S_max, S_noise: stochasticity; at steps with S_min <= sigma_i <= S_max,
        gamma_i = min(S_churn / N, sqrt(2) - 1) and fresh noise raises sigma_i to sigma_i (1 + gamma_i).
    generators: one torch.Generator per image for the churn noise (as `generate` creates them);
        None draws it from the global generator.
    dtype: the arithmetic of the sampler state and schedule (the networks run in their own precision;
        their outputs are cast to `dtype`). float32 matches the published release.
    denoiser: an already built `GuidedDenoiser` to use instead of net/gnets/guidance/... (e.g. to read
        its evaluation counters afterwards).
    """
    if denoiser is None:
        denoiser = GuidedDenoiser(net, gnets, guidance, guide_weights, guidance_interval, dtype=dtype)
    if generators is not None and len(generators) != noise.shape[0]:
        raise SamplingError(f'{len(generators)} generators given for a batch of {noise.shape[0]} images')
    if S_churn < 0 or S_noise < 0:
        raise SamplingError(f'S_churn and S_noise must be non-negative, got {S_churn:g}, {S_noise:g}')

    # The schedule is computed in the sampler's dtype, like the rest of the state, on the CPU: the Heun
    # arithmetic uses its 0-dim tensors as scalars (no device sync), and the per-step decisions read them
    # directly. The noise levels handed to the networks go to the device once, up front.
    t_steps = time_steps(num_steps, sigma_min, sigma_max, rho, dtype=dtype)
    gamma_max = min(S_churn / num_steps, math.sqrt(2) - 1)
    churn = [gamma_max > 0 and S_min <= float(t) <= S_max for t in t_steps[:-1]]
    t_hats = [t + gamma_max * t if c else t for t, c in zip(t_steps[:-1], churn)]  # sigma_hat = sigma (1 + gamma)
    on_device = torch.stack(t_hats + list(t_steps)).to(noise.device)
    hat_dev, next_dev = on_device[:num_steps], on_device[num_steps + 1:]

    x_next = noise.to(dtype) * t_steps[0]
    for i in range(num_steps):
        t_cur, t_hat, t_next = t_steps[i], t_hats[i], t_steps[i + 1]
        x_cur = x_next

        # Churn: temporarily raise the noise level by a factor (1 + gamma) with fresh noise
        # (EDM Algorithm 2, lines 4-6). No noise is drawn at steps without churn.
        if churn[i]:
            eps = _per_image_randn(generators, x_cur) if generators is not None else torch.randn_like(x_cur)
            x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * eps
        else:
            x_hat = x_cur

        # Euler step from t_hat to t_next.
        d_cur = (x_hat - denoiser(x_hat, hat_dev[i], labels, sigma_value=float(t_hat))) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order (trapezoidal) correction, except on the last step where t_next = 0.
        if i < num_steps - 1:
            d_prime = (x_next - denoiser(x_next, next_dev[i], labels, sigma_value=float(t_next))) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


# ----------------------------------------------------------------------------------------------------
# Seeds -> images.

def split_seeds(seeds: Sequence[int], batch_size: int, rank: int = 0, world_size: int = 1) -> list:
    """The batches of seeds that `rank` generates (SPEC section 5).

    The seeds are cut into num_batches = max(ceil(len / (batch_size * world_size)), 1) * world_size
    consecutive chunks whose sizes differ by at most one (the first len % num_batches chunks are one
    longer); rank r takes chunks r, r + world_size, ... Chunks may be empty when there are fewer seeds than
    chunks. Every rank gets the same number of chunks.
    """
    if batch_size < 1:
        raise SamplingError(f'batch size must be at least 1, got {batch_size}')
    seeds = list(seeds)
    num_batches = max(-(-len(seeds) // (batch_size * world_size)), 1) * world_size
    base, extra = divmod(len(seeds), num_batches)
    chunks, start = [], 0
    for b in range(num_batches):
        size = base + (1 if b < extra else 0)
        chunks.append(seeds[start:start + size])
        start += size
    return chunks[rank::world_size]


def rgb_decode(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1]-scaled pixels -> uint8, truncating: uint8(clip(x * 127.5 + 128, 0, 255)) (SPEC section 5)."""
    return (x.to(torch.float32) * 127.5 + 128).clip(0, 255).to(torch.uint8)


@dataclasses.dataclass
class GeneratedBatch:
    """One batch yielded by `generate`."""
    seeds: list                      # the seeds of this batch, in order (ints)
    images: torch.Tensor             # uint8 [n, C, H, W] on the sampling device
    labels: Optional[torch.Tensor]   # int64 [n] class index per image (after --class), or None if unconditional


def _device_of(net, device):
    if device is not None:
        return torch.device(device)
    try:
        return next(net.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device('cpu')


def generate(net, seeds, *, encoder=None, gnets=(), guidance=1.0, guide_weights=None, guidance_interval=None,
             class_idx=None, batch_size=32, device=None, rank=None, world_size=None, skip=None,
             progress=False, dtype=torch.float32, **sampler_kwargs) -> Iterator[GeneratedBatch]:
    """Generate the images of `seeds`, as `generate_images.py` does, one batch at a time (SPEC section 5).

    Contract (used by `generate_images.py` and `calculate_metrics.py gen`):

    net, gnets: loaded denoisers (e.g. from `edm2.load_snapshot`), already on `device`, in eval mode.
        Guides are checked with `check_guides`; `guidance`, `guide_weights`, `guidance_interval` as in
        `GuidedDenoiser` (guidance != 1 without a guide raises SamplingError).
    seeds: a sequence of non-negative ints. Each image gets its own torch.Generator on `device` seeded
        with seed % 2**32, from which, in this order, come: the initial noise randn([C, H, W]); for a
        conditional net the class randint(label_dim) (drawn even when `class_idx` replaces it); the churn
        noise of the sampler.
    class_idx: None (random class per seed) or a class index in [0, label_dim) for every image;
        SamplingError if out of range or given for an unconditional net.
    batch_size, rank, world_size: the seeds are split with `split_seeds(seeds, batch_size, rank,
        world_size)`; rank and world_size default to `edm2.distributed.get_rank()/get_world_size()` (call
        `edm2.distributed.init` first under torchrun). The same seeds give the same images whatever the
        number of ranks (up to float rounding when the batch composition differs).
    encoder: has `decode(x) -> uint8 NCHW` (e.g. `edm2.encoders.StandardRGBEncoder` or the VAE encoder,
        whose `init(device)` is called first when present); None decodes as RGB pixels (`rgb_decode`).
    skip: optional predicate seed -> bool; a batch all of whose seeds satisfy it is neither sampled nor
        yielded (resuming an interrupted run without changing the batching of the others).
    progress: show a tqdm bar over this rank's batches on rank 0.
    dtype, **sampler_kwargs: passed to `edm_sampler` (num_steps, sigma_min, sigma_max, rho, S_churn,
        S_min, S_max, S_noise).

    Yields `GeneratedBatch(seeds, images, labels)` for each non-empty batch of this rank: the seeds in
    order, uint8 images [n, C, H, W] on `device`, and the int64 class indices [n] (None for an
    unconditional net). All settings are validated before the first batch is sampled, i.e. before the
    first `next()` returns; settings errors are raised as SamplingError.
    """
    gen = _generate(net, seeds, encoder, gnets, guidance, guide_weights, guidance_interval, class_idx,
                    batch_size, device, rank, world_size, skip, progress, dtype, sampler_kwargs)
    next(gen)  # run the validation now, so that bad settings fail at the call, not at the first batch
    return gen


def _generate(net, seeds, encoder, gnets, guidance, guide_weights, guidance_interval, class_idx,
              batch_size, device, rank, world_size, skip, progress, dtype, sampler_kwargs):
    device = _device_of(net, device)
    rank = distributed.get_rank() if rank is None else rank
    world_size = distributed.get_world_size() if world_size is None else world_size
    seeds = [int(s) for s in seeds]
    if any(s < 0 for s in seeds):
        raise SamplingError('seeds must be non-negative integers')
    label_dim = int(getattr(net, 'label_dim', 0) or 0)
    if class_idx is not None:
        if label_dim == 0:
            raise SamplingError(f'class {class_idx} requested but the network is unconditional (label_dim 0)')
        if not 0 <= int(class_idx) < label_dim:
            raise SamplingError(f'class {class_idx} out of range: the network has {label_dim} classes (0..{label_dim - 1})')
    denoiser = GuidedDenoiser(net, gnets, guidance, guide_weights, guidance_interval, dtype=dtype)
    unknown = set(sampler_kwargs) - {'num_steps', 'sigma_min', 'sigma_max', 'rho', 'S_churn', 'S_min', 'S_max', 'S_noise'}
    if unknown:
        raise TypeError(f'unknown sampler arguments: {sorted(unknown)}')
    batches = split_seeds(seeds, batch_size, rank, world_size)
    shape = [int(net.img_channels), int(net.img_resolution), int(net.img_resolution)]
    if encoder is not None and hasattr(encoder, 'init'):
        encoder.init(device)
    yield None  # validation done

    bar = None
    if progress and rank == 0:
        import tqdm
        bar = tqdm.tqdm(total=sum(len(b) for b in batches), unit='img', desc='Generating')
    try:
        for batch_seeds in batches:
            if not batch_seeds:
                continue
            if skip is not None and all(skip(s) for s in batch_seeds):
                if bar is not None:
                    bar.update(len(batch_seeds))
                continue
            generators = [torch.Generator(device).manual_seed(s % (1 << 32)) for s in batch_seeds]
            noise = torch.stack([torch.randn(shape, generator=g, device=device) for g in generators])
            classes, labels = None, None
            if label_dim > 0:
                classes = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device)
                                       for g in generators])
                if class_idx is not None:
                    classes = torch.full_like(classes, int(class_idx))
                labels = torch.nn.functional.one_hot(classes, label_dim).to(torch.float32)
            x = edm_sampler(net, noise, labels, generators=generators, dtype=dtype, denoiser=denoiser,
                            **sampler_kwargs)
            images = encoder.decode(x) if encoder is not None else rgb_decode(x)
            yield GeneratedBatch(seeds=batch_seeds, images=images, labels=classes)
            if bar is not None:
                bar.update(len(batch_seeds))
    finally:
        if bar is not None:
            bar.close()
