"""Checking network constructor arguments before a network is built from them.

`Precond(**kwargs)` allocates every parameter at once, so arguments from an untrusted place (a
checkpoint header, a command line, an options file) are checked first: every field's type and
range, and the parameter count they imply, counted on PyTorch's meta device, which records
shapes without allocating memory or drawing random numbers.

    >>> from edm2.network_config import check_network_kwargs
    >>> check_network_kwargs(network_kwargs('xs', 'img512'))          # -> parameter count
    124713253
    >>> check_network_kwargs(dict(img_resolution=64, img_channels=3, model_channels=-8))
    Traceback (most recent call last):
    edm2.network_config.NetworkConfigError: network argument model_channels: expected an integer in [1, 65536], got -8
"""

import math
import numbers

import torch

from edm2.errors import EDM2Error, one_line
from edm2.networks import Precond

__all__ = ['NetworkConfigError', 'check_network_kwargs', 'count_parameters', 'state_shapes', 'DEFAULT_MAX_PARAMS']

# Ten billion parameters (40 GB in float32): about 6.5 times the largest published network (XXL).
DEFAULT_MAX_PARAMS = 10_000_000_000

_MAX_WIDTH = 1 << 16        # channels of any one layer or multiplier product
_MAX_RESOLUTION = 1 << 13
_MAX_LEVELS = 14            # log2(_MAX_RESOLUTION) + 1
_MAX_BLOCKS = 64
_MAX_MULT = 1 << 10
_MAX_LABELS = 1 << 20

_REQUIRED = ('img_resolution', 'img_channels')


class NetworkConfigError(EDM2Error):
    """Network constructor arguments of the wrong type, out of range, or too large to build."""


def _fail(field, expected, value):
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + '...'
    return NetworkConfigError(f'network argument {field}: expected {expected}, got {text}')


def _int(field, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
        raise _fail(field, f'an integer in [{lo}, {hi}]', value)


def _optional_int(field, value, lo, hi):
    if value is not None:
        _int(field, value, lo, hi)


def _real(field, value, lo, hi, hi_open=False):
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not lo <= value <= hi or (hi_open and value == hi):
        raise _fail(field, f'a number in [{lo}, {hi}{")" if hi_open else "]"}', value)


def _int_list(field, value, lo, hi, min_len, max_len):
    ok = isinstance(value, (list, tuple)) and min_len <= len(value) <= max_len
    if ok:
        ok = all(not isinstance(v, bool) and isinstance(v, numbers.Integral) and lo <= v <= hi for v in value)
    if not ok:
        size = f'{min_len} to {max_len}' if min_len else f'at most {max_len}'
        raise _fail(field, f'a list of {size} integers in [{lo}, {hi}]', value)


def _power_of_two(n):
    return n > 0 and n & (n - 1) == 0


def _check_fields(kw):
    """Type and range of every field that is present (absent ones take the constructors' defaults)."""
    checks = {
        'img_channels': lambda v: _int('img_channels', v, 1, _MAX_WIDTH),
        'label_dim': lambda v: _int('label_dim', v, 0, _MAX_LABELS),
        'model_channels': lambda v: _int('model_channels', v, 1, _MAX_WIDTH),
        'channel_mult': lambda v: _int_list('channel_mult', v, 1, _MAX_MULT, 1, _MAX_LEVELS),
        'channel_mult_noise': lambda v: _optional_int('channel_mult_noise', v, 1, _MAX_MULT),
        'channel_mult_emb': lambda v: _optional_int('channel_mult_emb', v, 1, _MAX_MULT),
        'num_blocks': lambda v: _int('num_blocks', v, 0, _MAX_BLOCKS),
        'attn_resolutions': lambda v: _int_list('attn_resolutions', v, 1, _MAX_RESOLUTION, 0, 64),
        'channels_per_head': lambda v: _int('channels_per_head', v, 1, _MAX_WIDTH),
        'logvar_channels': lambda v: _int('logvar_channels', v, 1, _MAX_WIDTH),
        'dropout': lambda v: _real('dropout', v, 0, 1, hi_open=True),
        'label_balance': lambda v: _real('label_balance', v, 0, 1),
        'concat_balance': lambda v: _real('concat_balance', v, 0, 1),
        'res_balance': lambda v: _real('res_balance', v, 0, 1),
        'attn_balance': lambda v: _real('attn_balance', v, 0, 1),
        'sigma_data': lambda v: _real('sigma_data', v, 1e-3, 1e3),
        'clip_act': lambda v: None if v is None else _real('clip_act', v, 1e-3, 1e30),
    }
    unknown = sorted(set(kw) - set(checks) - {'img_resolution', 'use_fp16', 'resample_filter'})
    if unknown:
        raise NetworkConfigError(f'unknown network argument {unknown[0]} (expected some of: '
                                 f'{", ".join(sorted([*checks, "img_resolution", "use_fp16", "resample_filter"]))})')
    for name in _REQUIRED:
        if name not in kw:
            raise NetworkConfigError(f'network argument {name} is missing')
    for name, value in kw.items():
        if name in checks:
            checks[name](value)
    if not isinstance(kw.get('use_fp16', True), bool):
        raise _fail('use_fp16', 'true or false', kw['use_fp16'])
    if list(kw.get('resample_filter', [1, 1])) != [1, 1]:
        raise _fail('resample_filter', '[1, 1] (the only filter supported)', kw['resample_filter'])


def _check_geometry(kw):
    """The resolution halves once per level and the attention resolutions are powers of two."""
    res = kw['img_resolution']
    if isinstance(res, bool) or not isinstance(res, numbers.Integral) or not _power_of_two(res) \
            or res > _MAX_RESOLUTION:
        raise _fail('img_resolution', f'a power of two in [1, {_MAX_RESOLUTION}]', res)
    levels = len(kw.get('channel_mult', (1, 2, 3, 4)))
    if res >> (levels - 1) < 1:
        raise _fail('channel_mult', f'at most {res.bit_length()} levels for img_resolution {res}',
                    kw.get('channel_mult', (1, 2, 3, 4)))
    for r in kw.get('attn_resolutions', ()):
        if not _power_of_two(r):
            raise _fail('attn_resolutions', 'powers of two', kw['attn_resolutions'])


def _meta_network(kwargs):
    with torch.device('meta'):
        return Precond(**kwargs)


def count_parameters(kwargs):
    """Parameters of Precond(**kwargs), counted on the meta device (no memory, no random numbers).

    Call check_network_kwargs first for untrusted input; this only builds the module tree.
    """
    return sum(p.numel() for p in _meta_network(kwargs).parameters())


def state_shapes(kwargs):
    """{state-dict key: shape} of Precond(**kwargs), from the meta device: what a checkpoint's tensors
    must match before the network is built for real (check the kwargs first)."""
    return {name: tuple(t.shape) for name, t in _meta_network(kwargs).state_dict().items()}


def check_network_kwargs(kwargs, max_params=DEFAULT_MAX_PARAMS):
    """Check Precond constructor kwargs from an untrusted source; return the parameter count.

    Every field is type- and range-checked (integers are not bools or floats, lists are lists of
    integers, numbers are finite), the geometry is checked (img_resolution a power of two that
    can be halved once per channel_mult level), and the parameter count, found without
    allocating, must not exceed `max_params` (None: no limit). Raises NetworkConfigError with a
    one-line message naming the offending field.
    """
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise NetworkConfigError(f'network arguments: expected a dict of named values, got {type(kwargs).__name__}')
    _check_fields(kwargs)
    _check_geometry(kwargs)
    try:
        count = count_parameters(kwargs)
    except Exception as e:  # noqa: BLE001 -- any construction failure is a configuration error
        raise NetworkConfigError(f'network arguments do not describe a buildable network: {one_line(e)}') from None
    if max_params is not None and count > max_params:
        raise NetworkConfigError(f'network arguments model_channels/channel_mult/num_blocks describe {count:,} '
                                 f'parameters, above the limit of {max_params:,}')
    return count
