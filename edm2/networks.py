"""The EDM2 denoiser network: the config-G U-Net F wrapped by EDM preconditioning into D(x; σ, c).

EDM2 paper (Karras et al., CVPR 2024), section 2 and appendix B, builds the U-Net from
magnitude-preserving parts (`edm2.mp`); the EDM paper (Karras et al., NeurIPS 2022), eq. 7 and
Table 1, gives the preconditioning. Module names, constructor arguments and state-dict keys are
those of the published checkpoints (`unet.enc.64x64_conv.weight`, `unet.dec.8x8_in0.attn_qkv.weight`,
`logvar_linear.weight`, ...), which is what lets them load.

Building a published configuration (sizes and shapes live in `configs/networks.toml`):

    >>> from edm2.networks import build_network, network_kwargs
    >>> network_kwargs('xs', 'img512')      # Precond constructor kwargs
    {'img_resolution': 64, 'img_channels': 4, 'label_dim': 1000, 'model_channels': 128, ...}
    >>> net = build_network('s', 'img64', dropout=0.1)   # a Precond
    >>> net = build_network(dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=32))
"""

import functools
import json
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from edm2 import presets, runtime
from edm2.mp import SILU_RMS, MPConv, MPFourier, is_channels_last, mp_cat, mp_silu, mp_sum, normalize, resample

__all__ = ['Block', 'UNet', 'Precond', 'PrecondCoefficients', 'precond_coefficients', 'network_kwargs',
           'build_network', 'PRECISIONS']

# net.precision -> dtype the U-Net runs in on CUDA (float32 on every other device, unless the run's
# settings name a precision: edm2.runtime).
PRECISIONS = runtime.PRECISIONS


def _mp_sum_weights(t):
    """The weights (1 - t) / hypot(1 - t, t) and t / hypot(1 - t, t) of a and b in mp_sum(a, b, t) (EDM2 eq. 88)."""
    norm = math.hypot(1 - t, t)
    return (1 - t) / norm, t / norm


def _layout_of(x):
    """The memory format `x` is stored in (channels-last or the default)."""
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class Block(torch.nn.Module):
    """A residual unit of the U-Net: resampling, a residual branch, optionally self-attention, clipping.

    EDM2 paper, config G (appendix B). Encoder blocks ('enc') widen their input with the 1x1
    `conv_skip` and normalise every pixel to unit RMS before the residual branch; decoder blocks
    ('dec') feed the residual branch the input as it comes and widen only the skip path.

        in_channels        channels of the input
        out_channels       channels of the output
        emb_channels       width of the embedding vector that scales the residual branch
        flavor             'enc' or 'dec'
        resample_mode      'keep', 'down' (mean of 2x2) or 'up' (copy to 2x2), applied first
        resample_filter    taps of the resampling filter; only the box filter [1, 1] is supported
        attention          add self-attention; a block narrower than one head gets none
        channels_per_head  channels of one attention head
        dropout            drop probability inside the residual branch while training
        res_balance        share t of the residual branch in mp_sum(skip, residual, t)
        attn_balance       share t of the attention branch in mp_sum(x, attention, t)
        clip_act           the output is clamped to [-clip_act, clip_act]; None: no clamp

    `perturbation`, an argument of the call (None except when `edm2.self_guides` evaluates a guide made from
    this network): 'pag' replaces the attention weights by the identity, 'skip' returns the input unchanged.
    """

    def __init__(self, in_channels, out_channels, emb_channels, flavor='enc', resample_mode='keep',
                 resample_filter=(1, 1), attention=False, channels_per_head=64, dropout=0,
                 res_balance=0.3, attn_balance=0.3, clip_act=256):
        super().__init__()
        if flavor not in ('enc', 'dec'):
            raise ValueError(f'Block flavor must be enc or dec, got {flavor!r}')
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_mode = resample_mode
        self.resample_filter = list(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act

        # The order of registration fixes the order of random initialisation and of parameters().
        self.emb_gain = torch.nn.Parameter(torch.zeros([]))
        branch_in = out_channels if flavor == 'enc' else in_channels  # encoders widen before the branch
        self.conv_res0 = MPConv(branch_in, out_channels, kernel=[3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=[])
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=[3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, kernel=[1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, kernel=[1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=[1, 1]) if self.num_heads else None

    def _widen(self, x):
        """The skip path's 1x1 convolution to out_channels, where the width changes."""
        return x if self.conv_skip is None else self.conv_skip(x)

    def _enter(self, x):
        """Resampled input; encoder blocks also widen it and normalise each pixel vector to unit RMS
        (the pixel norm that replaces group normalisation in config F)."""
        x = resample(x, f=self.resample_filter, mode=self.resample_mode)
        if self.flavor == 'enc':
            x = normalize(self._widen(x), dim=1)
        return x

    def _residual_branch(self, x, emb):
        """conv_res1(dropout(mp_silu(conv_res0(mp_silu(x)) * (1 + emb_linear(emb))))), times the branch's
        weight t / hypot(1 - t, t) in mp_sum(skip, branch, t) (t = res_balance).

        The embedding enters as a per-channel scale around 1; `emb_gain` starts at 0, so a fresh
        block is not modulated at all.
        """
        channel_scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        # mp_silu(z) = silu(z) / SILU_RMS: the division is folded into the next layer's weight, and so is
        # the residual branch's weight t / hypot(1 - t, t) in mp_sum (see forward).
        h = self.conv_res0(F.silu(x), scale=1 / SILU_RMS)
        h = F.silu(h * channel_scale.to(h.dtype).unsqueeze(-1).unsqueeze(-1))
        if self.training and self.dropout:  # the mask is drawn in NCHW order whatever the layout
            h = F.dropout(h.contiguous(), p=self.dropout, training=True).contiguous(memory_format=_layout_of(h))
        return self.conv_res1(h, scale=_mp_sum_weights(self.res_balance)[1] / SILU_RMS)

    def _attention_branch(self, x, identity=False):
        """Self-attention among the pixels, with every head's q, k and v normalised to unit RMS per pixel.

        The 3 * C output channels of `attn_qkv` are laid out as [head, channel within head, (q, k, v)]:
        the order the published weights were trained in. The weights softmax(q kᵀ / √d) v are those of
        Vaswani et al. (2017), eq. 1, computed by torch's fused scaled_dot_product_attention. `identity`: the
        attention weights are the identity.
        """
        n, c, h, w = x.shape
        head_channels = c // self.num_heads
        qkv = self.attn_qkv(x).permute(0, 2, 3, 1)                     # [n, h, w, 3c]: a view when channels-last
        qkv = normalize(qkv.reshape(n, h * w, self.num_heads, head_channels, 3), dim=3)
        # [n, head, (q, k, v), pixel, channel], each channel vector contiguous as the fused kernel wants it
        query, key, value = qkv.permute(0, 2, 4, 1, 3).contiguous().unbind(dim=2)
        if identity:  # identity attention weights: every pixel keeps its own value (PAG)
            mixed = value
        else:
            mixed = F.scaled_dot_product_attention(query, key, value)  # scale 1/√head_channels
        mixed = mixed.permute(0, 2, 1, 3).reshape(n, h, w, c).permute(0, 3, 1, 2)  # [n, c, h, w], NHWC in memory
        return self.attn_proj(mixed.contiguous(memory_format=_layout_of(x)))

    def forward(self, x, emb, perturbation=None):
        if perturbation == 'skip':  # skip-layer guidance: the block is left out
            return x
        x = self._enter(x)
        skip = self._widen(x) if self.flavor == 'dec' else x
        # mp_sum(skip, residual, t): the residual's weight t / hypot(1 - t, t) is already in its last layer.
        x = torch.add(self._residual_branch(x, emb), skip, alpha=_mp_sum_weights(self.res_balance)[0])
        if self.num_heads:
            x = mp_sum(x, self._attention_branch(x, identity=perturbation == 'pag'), t=self.attn_balance)
        if self.clip_act is None:
            return x
        return x.clamp(min=-self.clip_act, max=self.clip_act)  # rare outliers would overflow float16


class UNet(torch.nn.Module):
    """The config-G U-Net F(x, c_noise, class_labels) of the EDM2 paper (appendix B).

    An encoder of `Block`s halves the resolution level by level, a decoder doubles it back, and
    every encoder output reaches the decoder through an mp_cat skip connection. The noise level
    and the class enter through one embedding vector that scales every residual branch.

        img_resolution      side of the square input, in pixels (or latent cells)
        img_channels        channels of the input and output
        label_dim           number of classes; 0 for an unconditional network
        model_channels      base width; level l has model_channels * channel_mult[l] channels
        channel_mult        width multiplier of each resolution level, finest first
        channel_mult_noise  width of the Fourier noise features / model_channels; None: level 0's width
        channel_mult_emb    width of the embedding / model_channels; None: the widest level's width
        num_blocks          blocks per level in the encoder (the decoder has one more)
        attn_resolutions    resolutions whose blocks have self-attention
        label_balance       share t of the class in mp_sum(noise embedding, class embedding, t)
        concat_balance      share t of the skip in mp_cat(x, skip, t)
        **block_kwargs      passed on to every Block (channels_per_head, dropout, balances, clip_act, ...)
    """

    def __init__(self, img_resolution, img_channels, label_dim, model_channels=192,
                 channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
                 num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5,
                 **block_kwargs):
        super().__init__()
        self.level_channels = [model_channels * mult for mult in channel_mult]
        noise_channels = self.level_channels[0] if channel_mult_noise is None else model_channels * channel_mult_noise
        emb_channels = max(self.level_channels) if channel_mult_emb is None else model_channels * channel_mult_emb
        self.label_balance = label_balance
        self.concat_balance = concat_balance

        self.out_gain = torch.nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=[])
        self.emb_label = MPConv(label_dim, emb_channels, kernel=[]) if label_dim else None
        make_block = functools.partial(Block, emb_channels=emb_channels, **block_kwargs)
        self.enc = self._build_encoder(img_resolution, img_channels, num_blocks, attn_resolutions, make_block)
        self.dec = self._build_decoder(img_resolution, num_blocks, attn_resolutions, make_block)
        self.out_conv = MPConv(self.level_channels[0], img_channels, kernel=[3, 3])

    def _build_encoder(self, img_resolution, img_channels, num_blocks, attn_resolutions, make_block):
        """Level 0 opens with a 3x3 conv (image + a constant channel), the others with a 'down' block."""
        enc = torch.nn.ModuleDict()
        channels = img_channels + 1
        for level, width in enumerate(self.level_channels):
            res = img_resolution >> level
            if level == 0:
                enc[f'{res}x{res}_conv'] = MPConv(channels, width, kernel=[3, 3])
                channels = width
            else:
                enc[f'{res}x{res}_down'] = make_block(channels, channels, flavor='enc', resample_mode='down')
            for i in range(num_blocks):
                enc[f'{res}x{res}_block{i}'] = make_block(channels, width, flavor='enc',
                                                          attention=res in attn_resolutions)
                channels = width
        return enc

    def _build_decoder(self, img_resolution, num_blocks, attn_resolutions, make_block):
        """The deepest level opens with two blocks (the first attends), the others with an 'up' block;
        then num_blocks + 1 blocks per level, each fed one encoder output, last in first out."""
        skip_channels = [module.out_channels for module in self.enc.values()]
        dec = torch.nn.ModuleDict()
        channels = skip_channels[-1]
        deepest = len(self.level_channels) - 1
        for level in range(deepest, -1, -1):
            res = img_resolution >> level
            if level == deepest:
                dec[f'{res}x{res}_in0'] = make_block(channels, channels, flavor='dec', attention=True)
                dec[f'{res}x{res}_in1'] = make_block(channels, channels, flavor='dec')
            else:
                dec[f'{res}x{res}_up'] = make_block(channels, channels, flavor='dec', resample_mode='up')
            for i in range(num_blocks + 1):
                width = self.level_channels[level]
                dec[f'{res}x{res}_block{i}'] = make_block(channels + skip_channels.pop(), width, flavor='dec',
                                                          attention=res in attn_resolutions)
                channels = width
        return dec

    def embedding(self, noise_labels, class_labels):
        """The conditioning vector, in float32: Fourier features of c_noise through a linear layer,
        blended with the class embedding when conditional, then mp_silu (config G)."""
        emb = self.emb_noise(self.emb_fourier(noise_labels.float()))
        if self.emb_label is not None:
            # One-hot rows have RMS 1/sqrt(label_dim); scaling by sqrt(label_dim) makes it 1.
            classes = self.emb_label(class_labels.float() * math.sqrt(class_labels.shape[1]))
            emb = mp_sum(emb, classes, t=self.label_balance)
        return mp_silu(emb)

    def _encode(self, x, emb, perturbation):
        """The output of every encoder module, in order; the last one is where the decoder starts."""
        outputs = []
        for name, module in self.enc.items():
            x = module(x, emb, perturbation.get('enc.' + name)) if isinstance(module, Block) else module(x)
            outputs.append(x)
        return outputs

    def _decode(self, skips, emb, perturbation):
        """Run the decoder from the deepest encoder output, concatenating a skip before each `_block`."""
        x = skips[-1]
        for name, module in self.dec.items():
            if '_block' in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = module(x, emb, perturbation.get('dec.' + name))
        return x

    def forward(self, x, noise_labels, class_labels, perturbation=None):
        """F(x, c_noise, class_labels); `perturbation` maps block names ('enc.8x8_block1', 'dec.8x8_in0')
        to the perturbation of that block in this call only ('pag' or 'skip', see `Block`)."""
        perturbation = perturbation or {}
        emb = self.embedding(noise_labels, class_labels).to(x.dtype)
        # A constant channel of ones lets the 'same'-padded convolutions tell the border from the inside.
        x = F.pad(x, (0, 0, 0, 0, 0, 1), value=1).contiguous(memory_format=_layout_of(x))
        return self.out_conv(self._decode(self._encode(x, emb, perturbation), emb, perturbation), gain=self.out_gain)


class PrecondCoefficients(NamedTuple):
    """The four σ-dependent factors of EDM preconditioning, shaped like σ."""
    c_skip: torch.Tensor
    c_out: torch.Tensor
    c_in: torch.Tensor
    c_noise: torch.Tensor


def precond_coefficients(sigma, sigma_data):
    """EDM preconditioning, EDM paper Table 1: with s² = σ² + σ_d²,

        c_skip = σ_d² / s²,   c_out = σ σ_d / s,   c_in = 1 / s,   c_noise = ln(σ) / 4.

    c_in gives the network's input unit variance, c_out its target unit variance, and c_skip is the
    share of the noisy input that minimises the magnitude of what the network has to predict.
    """
    total_var = sigma.square() + sigma_data ** 2
    total_std = total_var.sqrt()
    return PrecondCoefficients(c_skip=sigma_data ** 2 / total_var, c_out=sigma * sigma_data / total_std,
                               c_in=1 / total_std, c_noise=sigma.log() / 4)


def _jsonable(value):
    """`value` as it comes back from JSON: tuples become lists, numpy numbers Python ones (init_kwargs
    must survive the native format's JSON header unchanged)."""
    def numpy_to_python(item):
        if isinstance(item, (np.generic, np.ndarray)):
            return item.tolist()
        raise TypeError(f'network arguments must be plain data, got a {type(item).__name__}')
    return json.loads(json.dumps(value, default=numpy_to_python))


class Precond(torch.nn.Module):
    """The denoiser D(x; σ, c) = c_skip x + c_out F(c_in x, c_noise, c) (EDM paper eq. 7), plus the
    learned log-uncertainty u(σ) that weights the training loss (EDM2 paper, config B).

    `precision` ('fp32' | 'fp16' | 'bf16'; initially 'fp16' if use_fp16 else 'fp32') is the dtype
    the U-Net runs in on CUDA unless force_fp32; on other devices it runs in float32. A run's settings
    (`edm2.runtime.RunSettings`) may name a precision for every device instead, and choose the memory
    layout and compilation of the U-Net. D and u(σ) are float32 either way. `perturbation` ({block name:
    'pag' | 'skip'}, see `UNet.forward`) perturbs blocks for this call only, as `edm2.self_guides` does:
    nothing is stored on the shared network.

        img_resolution   side of the square input
        img_channels     channels of the input
        label_dim        number of classes; 0 for an unconditional network
        use_fp16         start with precision 'fp16' (True) or 'fp32' (False)
        sigma_data       σ_d, the standard deviation of the data
        logvar_channels  Fourier features of the uncertainty head u(σ)
        **unet_kwargs    passed on to UNet (model_channels, channel_mult, dropout, ...)
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
        self.unet = UNet(img_resolution, img_channels, label_dim, **unet_kwargs)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=[])

    @property
    def gain_precision(self):
        """None (float32) or 'fp16' / 'bf16': the precision of the learned-gain scales in every MPConv.

        Published snapshots store their parameters in float16, and the network they were exported from
        divides those float16 gains by sqrt(fan_in) in float16. A network imported from one gets 'fp16'
        and so reproduces its outputs bit for bit; None gives plain float32 arithmetic.
        """
        return getattr(self, '_gain_precision', None)

    @gain_precision.setter
    def gain_precision(self, value):
        if value is not None and value not in PRECISIONS:
            raise ValueError(f'gain_precision must be None or one of {sorted(PRECISIONS)}, got {value!r}')
        self._gain_precision = value
        gain_dtype = None if value in (None, 'fp32') else PRECISIONS[value]
        for module in self.modules():
            if isinstance(module, MPConv):
                module.gain_dtype = gain_dtype

    def unet_dtype(self, device, force_fp32=False):
        """The dtype the U-Net runs in for inputs on `device`: float32 if force_fp32, else the precision of
        the run's settings (`edm2.runtime`) if they name one, else net.precision on CUDA and float32 elsewhere."""
        if force_fp32:
            return torch.float32
        if runtime.current().precision is not None:
            return PRECISIONS[runtime.current().precision]
        if torch.device(device).type != 'cuda':
            return torch.float32
        if self.precision not in PRECISIONS:
            raise ValueError(f'net.precision must be one of {sorted(PRECISIONS)}, got {self.precision!r}')
        return PRECISIONS[self.precision]

    def _sigma_per_image(self, sigma, x):
        """σ as float32 [N, 1, 1, 1]; one value is shared by the whole batch."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        return sigma.expand(x.shape[0], -1, -1, -1) if sigma.shape[0] == 1 else sigma

    def _label_rows(self, class_labels, x):
        """Label rows for the U-Net: None when unconditional; all-zero rows (which query a conditional
        network's unconditional branch) when no labels are given."""
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return x.new_zeros([x.shape[0], self.label_dim])
        return class_labels.to(torch.float32).reshape(-1, self.label_dim)

    def log_uncertainty(self, c_noise):
        """u(σ) = logvar_linear(logvar_fourier(c_noise)), shaped [N, 1, 1, 1]."""
        features = self.logvar_fourier(c_noise.flatten())
        return self.logvar_linear(features).reshape(-1, 1, 1, 1)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, return_logvar=False, perturbation=None):
        x = x.to(torch.float32)
        sigma = self._sigma_per_image(sigma, x)
        coef = precond_coefficients(sigma, self.sigma_data)
        unet_input = (coef.c_in * x).to(self.unet_dtype(x.device, force_fp32))
        if runtime.use_channels_last(x.device):  # the layout of every activation inside (edm2.runtime)
            unet_input = unet_input.contiguous(memory_format=torch.channels_last)
        prediction = runtime.call(self.unet, unet_input, coef.c_noise.flatten(), self._label_rows(class_labels, x),
                                  perturbation)
        denoised = coef.c_out * prediction.to(torch.float32).contiguous() + coef.c_skip * x
        if return_logvar:
            return denoised, self.log_uncertainty(coef.c_noise)
        return denoised


def network_kwargs(size, shape, **overrides):
    """Precond constructor kwargs of a published configuration, from `configs/networks.toml`.

    size: 'xxs' | 'xs' | 's' | 'm' | 'l' | 'xl' | 'xxl' (sets model_channels, EDM2 paper Table 2);
    shape: 'img512' (64x64x4 VAE latents, 1000 classes) | 'img64' (64x64x3 pixels, 1000 classes);
    the [unet] table supplies the other U-Net defaults; `overrides` (e.g. dropout=0.1, label_dim=0)
    win over all of them. Unknown names raise edm2.presets.PresetError naming the choices.
    """
    table = presets.load('networks')
    sizes, shapes, size_key = table['sizes'], table['shapes'], str(size).lower()
    if size_key not in sizes:
        raise presets.PresetError(f'unknown network size {size!r}; choose one of: {", ".join(sizes)}')
    if shape not in shapes:
        raise presets.PresetError(f'unknown network shape {shape!r}; choose one of: {", ".join(shapes)}')
    kwargs = dict(shapes[shape], model_channels=sizes[size_key])
    kwargs.update(table.get('unet', {}))
    kwargs.update(overrides)
    return _jsonable(kwargs)


def build_network(size_or_kwargs, shape='img512', **overrides):
    """A fresh Precond: build_network('xs', 'img512', dropout=0.1) or build_network({kwargs...}).

    With a size name the kwargs come from network_kwargs(size, shape, **overrides); with a dict
    they are used as given (plus overrides). Check untrusted kwargs first with
    `edm2.network_config.check_network_kwargs`, which also bounds the parameter count.
    """
    if isinstance(size_or_kwargs, dict):
        kwargs = dict(size_or_kwargs, **overrides)
    else:
        kwargs = network_kwargs(size_or_kwargs, shape, **overrides)
    return Precond(**kwargs)
