"""The EDM2 U-Net (config G) and its EDM preconditioner (EDM2 paper, appendix B; SPEC section 2).

Module names, constructor arguments and state-dict keys match the published checkpoints, e.g.
`unet.enc.64x64_conv.weight`, `unet.dec.8x8_in0.attn_qkv.weight`, `logvar_linear.weight`.

Building a published configuration (sizes and shapes live in `configs/networks.toml`):

    >>> from edm2.networks import build_network, network_kwargs
    >>> network_kwargs('xs', 'img512')      # Precond constructor kwargs
    {'img_resolution': 64, 'img_channels': 4, 'label_dim': 1000, 'model_channels': 128, ...}
    >>> net = build_network('s', 'img64', dropout=0.1)   # a Precond
    >>> net = build_network(dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=32))
"""

import numpy as np
import torch

from edm2 import presets
from edm2.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample

__all__ = ['Block', 'UNet', 'Precond', 'network_kwargs', 'build_network', 'PRECISIONS']

# net.precision -> dtype the U-Net runs in on CUDA (float32 on every other device).
PRECISIONS = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


class Block(torch.nn.Module):
    """Residual U-Net block (SPEC section 2): encoder or decoder flavour, optional 2x resampling,
    optional self-attention. Parameter names follow the published checkpoints."""

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=(1, 1), attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'Block flavor must be enc or dec, got {flavor!r}')
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = list(resample_filter)
        self.resample_mode = resample_mode
        # A width below one head (e.g. 32 channels at 64 per head) means no attention at all.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act

        # The encoder normalises (and widens) the stream before the residual branch, so its first conv
        # already sees out_channels; the decoder widens only at the skip connection, after it.
        res0_in = out_channels if flavor == 'enc' else in_channels
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(res0_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = None
        if in_channels != out_channels:
            self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1])
        self.attn_qkv = self.attn_proj = None
        if self.num_heads > 0:
            self.attn_qkv = MPConv(out_channels, 3 * out_channels, kernel=[1, 1])
            self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1])

    def _residual(self, x, emb):
        """conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb)))))."""
        h = self.conv_res0(mp_silu(x))
        modulation = 1 + self.emb_linear(emb, gain=self.emb_gain)
        h = mp_silu(h * modulation[:, :, None, None].to(h.dtype))
        if self.training and self.dropout:
            h = torch.nn.functional.dropout(h, p=self.dropout)
        return self.conv_res1(h)

    def _attention(self, x):
        """Multi-head self-attention over pixels with pixel-normalised (cosine) q, k and v."""
        n, c, height, width = x.shape
        head_dim = c // self.num_heads
        # The published weights lay the 3*c output channels out as [heads, head_dim, (q, k, v)].
        qkv = self.attn_qkv(x).reshape(n, self.num_heads, head_dim, 3, height * width)
        qkv = normalize(qkv, dim=2)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]      # [n, heads, head_dim, pixels]
        logits = torch.matmul(q.transpose(2, 3), k / np.sqrt(head_dim))  # [n, heads, query, key]
        out = torch.matmul(v, logits.softmax(dim=-1).transpose(2, 3))    # [n, heads, head_dim, query]
        return self.attn_proj(out.reshape(n, c, height, width))

    def forward(self, x, emb):
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm keeps the encoder's stream at unit RMS per pixel
        y = self._residual(x, emb)
        if self.flavor == 'dec' and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads > 0:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)  # guards reduced precision against rare outliers
        return x


class UNet(torch.nn.Module):
    """The EDM2 U-Net F(x, c_noise, class_labels), config G (SPEC section 2)."""

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        noise_width = widths[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb_width = max(widths) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_width)
        self.emb_noise = MPConv(noise_width, emb_width, kernel=[])
        self.emb_label = MPConv(label_dim, emb_width, kernel=[]) if label_dim else None

        def block(cin, cout, flavor, **kwargs):
            return Block(cin, cout, emb_width, flavor=flavor, **block_kwargs, **kwargs)

        # Encoder: per level a stem conv (level 0, on the image plus a constant channel of ones that
        # marks the borders) or a downsampling block, then num_blocks blocks. Every module's output is
        # a skip connection; `skip_widths` records them in order.
        self.enc = torch.nn.ModuleDict()
        skip_widths = []
        width = img_channels + 1
        for level, level_width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f'{res}x{res}_conv'] = MPConv(width, level_width, kernel=[3, 3])
                width = level_width
            else:
                self.enc[f'{res}x{res}_down'] = block(width, width, 'enc', resample_mode='down')
            skip_widths.append(width)
            for i in range(num_blocks):
                self.enc[f'{res}x{res}_block{i}'] = block(width, level_width, 'enc',
                                                          attention=res in attn_resolutions)
                width = level_width
                skip_widths.append(width)

        # Decoder, deepest level first: two bottleneck blocks (the first with attention) or an
        # upsampling block, then num_blocks + 1 blocks that each take one skip, last in first out.
        self.dec = torch.nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f'{res}x{res}_in0'] = block(width, width, 'dec', attention=True)
                self.dec[f'{res}x{res}_in1'] = block(width, width, 'dec')
            else:
                self.dec[f'{res}x{res}_up'] = block(width, width, 'dec', resample_mode='up')
            for i in range(num_blocks + 1):
                self.dec[f'{res}x{res}_block{i}'] = block(width + skip_widths.pop(), widths[level], 'dec',
                                                          attention=res in attn_resolutions)
                width = widths[level]
        self.out_conv = MPConv(width, img_channels, kernel=[3, 3])

    def embedding(self, noise_labels, class_labels):
        """mp_silu of the noise embedding, blended with the class embedding when conditional (float32)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels.float()))
        if self.emb_label is not None:
            onehot = class_labels.float()
            label_emb = self.emb_label(onehot * np.sqrt(onehot.shape[1]))  # unit-RMS one-hot rows
            emb = mp_sum(emb, label_emb, t=self.label_balance)
        return mp_silu(emb)

    def forward(self, x, noise_labels, class_labels):
        emb = self.embedding(noise_labels, class_labels).to(x.dtype)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for module in self.enc.values():
            x = module(x) if isinstance(module, MPConv) else module(x, emb)
            skips.append(x)
        for name, module in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb)
        return self.out_conv(x, gain=self.out_gain)


def _jsonable(value):
    """Tuples -> lists, numpy scalars -> Python, recursively (for init_kwargs and the native format)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class Precond(torch.nn.Module):
    """EDM preconditioning around the U-Net plus the learned loss uncertainty logvar(sigma).

    D(x; sigma, c) = c_skip x + c_out F(c_in x, c_noise, c) (EDM paper, table 1), with
    c_skip = sd^2/(sigma^2+sd^2), c_out = sigma sd / sqrt(sigma^2+sd^2), c_in = 1/sqrt(sigma^2+sd^2),
    c_noise = ln(sigma)/4.

    `precision` ('fp32' | 'fp16' | 'bf16', initially 'fp16' if use_fp16 else 'fp32') selects the dtype
    F runs in on CUDA unless force_fp32; on other devices F always runs in float32. The output D and
    logvar are float32 either way.
    """

    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=True, sigma_data=0.5,
                 logvar_channels=128, **unet_kwargs):
        super().__init__()
        self.init_kwargs = _jsonable(dict(img_resolution=img_resolution, img_channels=img_channels,
                                          label_dim=label_dim, use_fp16=use_fp16, sigma_data=sigma_data,
                                          logvar_channels=logvar_channels, **unet_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.precision = 'fp16' if use_fp16 else 'fp32'
        self.sigma_data = sigma_data
        self.unet = UNet(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                         **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def gain_precision(self):
        """None (float32) or 'fp16' / 'bf16': the precision of the learned-gain scales in every MPConv.

        Published snapshots store float16 parameters and the release computes gain / sqrt(fan_in) in
        that precision; networks imported from them get 'fp16' so that they reproduce the release's
        outputs bit for bit. Set to None for plain float32 arithmetic.
        """
        return getattr(self, '_gain_precision', None)

    @gain_precision.setter
    def gain_precision(self, value):
        if value is not None and value not in PRECISIONS:
            raise ValueError(f'gain_precision must be None or one of {sorted(PRECISIONS)}, got {value!r}')
        self._gain_precision = value
        for m in self.modules():
            if isinstance(m, MPConv):
                m.gain_dtype = None if value in (None, 'fp32') else PRECISIONS[value]

    def unet_dtype(self, device, force_fp32=False):
        """The dtype F runs in for inputs on `device`."""
        if force_fp32 or torch.device(device).type != 'cuda':
            return torch.float32
        if self.precision not in PRECISIONS:
            raise ValueError(f'net.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}')
        return PRECISIONS[self.precision]

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if sigma.shape[0] == 1:
            sigma = sigma.expand(x.shape[0], 1, 1, 1)  # one sigma for the whole batch
        if self.label_dim == 0:
            class_labels = None  # an unconditional net ignores labels
        elif class_labels is None:
            # All-zero label rows query the unconditional branch of a conditional net.
            class_labels = torch.zeros([x.shape[0], self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = self.unet_dtype(x.device, force_fp32)

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        F_x = self.unet((c_in * x).to(dtype), c_noise.flatten(), class_labels)
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        if not return_logvar:
            return D_x
        logvar = self.logvar_linear(self.logvar_fourier(c_noise.flatten())).reshape(-1, 1, 1, 1)
        return D_x, logvar


def network_kwargs(size, shape, **overrides):
    """Precond constructor kwargs of a published configuration, from `configs/networks.toml`.

    size: 'xxs' | 'xs' | 's' | 'm' | 'l' | 'xl' | 'xxl' (sets model_channels, SPEC section 2);
    shape: 'img512' (64x64x4 VAE latents, 1000 classes) | 'img64' (64x64x3 pixels, 1000 classes);
    the [unet] table supplies the other U-Net defaults; `overrides` (e.g. dropout=0.1, label_dim=0)
    win over all of them. Unknown names raise edm2.presets.PresetError naming the choices.
    """
    table = presets.load('networks')
    sizes = table['sizes']
    shapes = table['shapes']
    if str(size).lower() not in sizes:
        raise presets.PresetError(f'unknown network size {size!r}; choose one of: {", ".join(sizes)}')
    if shape not in shapes:
        raise presets.PresetError(f'unknown network shape {shape!r}; choose one of: {", ".join(shapes)}')
    kwargs = dict(shapes[shape])
    kwargs['model_channels'] = sizes[str(size).lower()]
    kwargs.update(table.get('unet', {}))
    kwargs.update(overrides)
    return _jsonable(kwargs)


def build_network(size_or_kwargs, shape='img512', **overrides):
    """A fresh Precond: build_network('xs', 'img512', dropout=0.1) or build_network({kwargs...}).

    With a size name the kwargs come from network_kwargs(size, shape, **overrides); with a dict
    they are used as given (plus overrides). Create it under `torch.device('meta')` to count
    parameters without allocating memory.
    """
    if isinstance(size_or_kwargs, dict):
        kwargs = dict(size_or_kwargs, **overrides)
    else:
        kwargs = network_kwargs(size_or_kwargs, shape, **overrides)
    return Precond(**kwargs)
