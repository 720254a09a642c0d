"""Magnitude-preserving building blocks: the layers of the EDM2 U-Net that keep activations at unit variance.

EDM2 paper (Karras et al., CVPR 2024), section 2: configs D-G and their appendix derivations.
Each primitive maps unit-variance inputs to (about) unit-variance outputs, which is what lets the
network train without normalisation layers while activations and weights keep their magnitudes.
"""

import math

import torch
import torch.nn.functional as F

__all__ = ['normalize', 'mp_silu', 'mp_sum', 'mp_cat', 'resample', 'MPFourier', 'MPConv', 'is_channels_last']

SILU_RMS = 0.596  # RMS of silu(z) for z ~ N(0, 1) (paper eq. 81)


def normalize(x, dim=None, eps=1e-4):
    """Scale every group of `x` to unit RMS: x / (eps + RMS(x)), the RMS taken over `dim` in float32 (or float64).

    `dim` defaults to every axis but the first, so a weight [out, in, kh, kw] is normalised per output
    channel. RMS = ||x|| / sqrt(group size), i.e. ||x|| * sqrt(n_norm / n_x) with n_norm/n_x the fraction of elements in one group.
    """
    dims = tuple(range(1, x.ndim)) if dim is None else dim
    group_norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.promote_types(x.dtype, torch.float32))
    group_size = max(x.numel() // max(group_norm.numel(), 1), 1)
    rms = group_norm * (1 / math.sqrt(group_size))
    return x / (eps + rms).to(x.dtype)


def mp_silu(x):
    """SiLU rescaled to unit output RMS for unit-normal input."""
    return F.silu(x) / SILU_RMS


def mp_sum(a, b, t=0.5):
    """Blend with weight t on b, renormalised so two independent unit-RMS inputs stay unit RMS (eq. 88)."""
    return a.lerp(b, t) / math.hypot(1 - t, t)


def mp_cat(a, b, dim=1, t=0.5):
    """Concatenate [a, b] along `dim`; b's share of the output's energy is set by t (eq. 103).

    Each part is first brought to unit RMS per element of its own width, then weighted by (1 - t) and t,
    and the whole is rescaled so the concatenation keeps unit RMS.
    """
    n_a, n_b = a.shape[dim], b.shape[dim]
    total = math.sqrt(n_a + n_b) / math.hypot(1 - t, t)
    return torch.cat([a * ((1 - t) * total / math.sqrt(n_a)), b * (t * total / math.sqrt(n_b))], dim=dim)


def resample(x, f=(1, 1), mode='keep'):
    """2x resampling with the normalised 2-tap box filter [1, 1] (EDM2 paper, appendix B).

    'down': each output pixel is the mean of a 2x2 input block (the depthwise 2x2 conv of 0.25s with
    stride 2); 'up': each input pixel is copied into a 2x2 output block (the transposed conv of the
    same filter times 4); 'keep': identity. Only the published [1, 1] filter is supported.
    """
    if mode == 'keep':
        return x
    if list(f) != [1, 1]:
        raise NotImplementedError(f'only the [1, 1] box filter is supported, got {list(f)}')
    if mode == 'down':
        return F.avg_pool2d(x, kernel_size=2, stride=2)
    if mode == 'up':
        return F.interpolate(x, scale_factor=2, mode='nearest')  # an exact copy; keeps channels-last layout
    raise ValueError(f'unknown resample mode {mode!r}')


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar (the noise level): sqrt(2) cos(2 pi (f x + phi)), unit RMS.

    Buffers: `freqs` = 2 pi N(0, 1) * bandwidth and `phases` = 2 pi U(0, 1), fixed at construction.

        num_channels  number of features
        bandwidth     standard deviation of the frequencies, in cycles per unit of x
    """

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels) * (2 * math.pi * bandwidth))
        self.register_buffer('phases', torch.rand(num_channels) * (2 * math.pi))

    def forward(self, x):
        angle = x.float().unsqueeze(-1) * self.freqs.float() + self.phases.float()
        return (angle.cos() * math.sqrt(2)).to(x.dtype)  # cos of a uniform phase has RMS 1/sqrt(2)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution or fully connected layer with forced weight normalisation.

    EDM2 paper, configs D and E: the weight in use is the stored one brought to unit RMS per output
    channel and scaled by gain / sqrt(fan_in) (unit norm per output channel for gain 1), so a
    unit-variance input gives a unit-variance output. While training, the stored weight itself is
    also kept at unit RMS ("forced weight normalisation"), so an optimiser step changes its
    direction but not its size.

        in_channels   input channels
        out_channels  output channels
        kernel        [] for a fully connected layer (x @ W^T), [k, k] for a k x k 'same' convolution
    """

    # Precision of a learned (tensor) gain divided by sqrt(fan_in); None means float32. Networks
    # imported from a published snapshot set it to float16 through Precond.gain_precision, because
    # the published parameters are stored in float16 and that is where their rounding shows.
    gain_dtype = None

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    @property
    def fan_in(self):
        """Inputs that feed one output value: in_channels times the kernel's taps."""
        return math.prod(self.weight.shape[1:])

    def _gain_scale(self, gain):
        """gain / sqrt(fan_in), rounded to `gain_dtype` when the gain is a learned tensor."""
        scale = gain / math.sqrt(self.fan_in)
        if torch.is_tensor(scale) and self.gain_dtype is not None:
            scale = scale.to(self.gain_dtype)
        return scale

    def _renormalise_stored_weight(self):
        """Forced weight normalisation (config E): overwrite the parameter with its unit-RMS version."""
        with torch.no_grad():
            self.weight.copy_(normalize(self.weight.float()))

    def effective_weight(self, gain=1, scale=1):
        """The float32 weight the layer applies: unit-RMS rows times gain / sqrt(fan_in) (times `scale`).

        Normalising inside the graph (even right after the forced renormalisation, where it changes
        nothing but the eps) makes the gradient orthogonal to the weight, as weight normalisation needs.
        """
        weight = normalize(self.weight.float()) * self._gain_scale(gain)
        return weight if scale == 1 else weight * scale

    def forward(self, x, gain=1, scale=1):
        """The layer applied to x. `scale` is a constant folded into the weight: layer(x) * scale, or
        layer(x * scale), without a pass over the activations."""
        if self.training:
            self._renormalise_stored_weight()
        weight = self.effective_weight(gain, scale).to(x.dtype)
        if not self.weight.shape[2:]:
            return F.linear(x, weight)
        if weight.shape[2:] == (1, 1) and is_channels_last(x):  # a 1x1 convolution is a matrix product per pixel
            return F.linear(x.permute(0, 2, 3, 1), weight.flatten(1)).permute(0, 3, 1, 2)
        return F.conv2d(x, weight, padding=weight.shape[-1] // 2)


def is_channels_last(x):
    """Whether the tensor x is [N, C, H, W] stored pixel by pixel (NHWC), and not also as NCHW."""
    if x.dim() != 4:
        return False
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
