"""Magnitude-preserving building blocks of EDM2 (paper section 3, appendix B; SPEC section 1).

Every primitive here keeps unit-variance inputs at (about) unit variance at the output, so that
activations and weights keep their magnitudes throughout training without normalisation layers.
"""

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ['normalize', 'mp_silu', 'mp_sum', 'mp_cat', 'resample', 'MPFourier', 'MPConv']


def normalize(x, dim=None, eps=1e-4):
    """x / (eps + RMS(x)) over `dim` (default: every axis but the first), computed in float32.

    RMS = ||x|| * sqrt(n_groups / n_total) = ||x|| / sqrt(elements per group), so every group comes out
    with unit RMS. For a weight [out, in, kh, kw] this normalises each output channel.
    """
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    norm = torch.add(eps, norm, alpha=np.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x):
    """SiLU divided by its output RMS for unit-normal input (0.596), paper eq. 81."""
    return F.silu(x) / 0.596


def mp_sum(a, b, t=0.5):
    """Magnitude-preserving interpolation ((1-t) a + t b) / sqrt((1-t)^2 + t^2), paper eq. 88."""
    return a.lerp(b, t) / np.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a, b, dim=1, t=0.5):
    """Magnitude-preserving concatenation [a, b] along `dim` with relative weight t on b (eq. 103)."""
    Na = a.shape[dim]
    Nb = b.shape[dim]
    C = np.sqrt((Na + Nb) / ((1 - t) ** 2 + t ** 2))
    wa = C / np.sqrt(Na) * (1 - t)
    wb = C / np.sqrt(Nb) * t
    return torch.cat([wa * a, wb * b], dim=dim)


def resample(x, f=(1, 1), mode='keep'):
    """2x box-filter down/upsampling, depthwise (SPEC section 1).

    The 1-D filter f is normalised to sum 1 and its outer product gives the 2-D kernel
    ([1,1] -> 2x2 of 0.25). 'down' = strided depthwise conv; 'up' = strided depthwise transposed conv
    with the kernel times 4 (so a constant image stays constant); 'keep' = identity.
    """
    if mode == 'keep':
        return x
    f = np.float32(f)
    assert f.ndim == 1 and len(f) % 2 == 0
    pad = (len(f) - 1) // 2
    f = f / f.sum()
    f = np.outer(f, f)[np.newaxis, np.newaxis, :, :]
    f = torch.as_tensor(f, dtype=x.dtype, device=x.device)
    c = x.shape[1]
    if mode == 'down':
        return F.conv2d(x, f.tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    if mode == 'up':
        return F.conv_transpose2d(x, (f * 4).tile([c, 1, 1, 1]), groups=c, stride=2, padding=(pad,))
    raise ValueError(f'unknown resample mode {mode!r}')


class MPFourier(torch.nn.Module):
    """Random Fourier features of a scalar (the noise level embedding), unit RMS output."""

    def __init__(self, num_channels, bandwidth=1):
        super().__init__()
        self.register_buffer('freqs', 2 * np.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer('phases', 2 * np.pi * torch.rand(num_channels))

    def forward(self, x):
        y = x.to(torch.float32)
        y = y.ger(self.freqs.to(torch.float32))
        y = y + self.phases.to(torch.float32)
        y = y.cos() * np.sqrt(2)  # cos of a uniform phase has RMS 1/sqrt(2)
        return y.to(x.dtype)


class MPConv(torch.nn.Module):
    """Magnitude-preserving convolution / fully-connected layer with forced weight normalisation.

    kernel=() gives a linear layer; kernel=(k, k) a 2-D convolution with 'same' padding.
    """

    # dtype in which a tensor-valued gain is divided by sqrt(fan_in); None = float32. Published
    # snapshots store their parameters in float16 and the release uses them as stored, so their gain
    # scales are rounded to float16; the importer sets this to reproduce it (Precond.gain_precision).
    gain_dtype = None

    def __init__(self, in_channels, out_channels, kernel):
        super().__init__()
        self.out_channels = out_channels
        self.weight = torch.nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x, gain=1):
        w = self.weight.to(torch.float32)
        if self.training:
            # Forced weight normalisation (paper section 3.2 / eq. 60): keep the stored weight on the
            # unit hypersphere so the effective learning rate does not decay as its norm grows.
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        w = normalize(w)  # traditional weight normalisation, still needed for correct gradients
        scale = gain / np.sqrt(w[0].numel())  # divide by sqrt(fan_in): unit-variance output
        if self.gain_dtype is not None and isinstance(scale, torch.Tensor):
            scale = scale.to(self.gain_dtype)
        w = w * scale
        w = w.to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        assert w.ndim == 4
        return F.conv2d(x, w, padding=(w.shape[-1] // 2,))
