"""check_network_kwargs: every constructor argument type- and range-checked, and the parameter count
bounded before anything is allocated."""

import math
import time

import psutil
import pytest
import torch

from edm2 import presets
from edm2.errors import EDM2Error
from edm2.network_config import (DEFAULT_MAX_PARAMS, NetworkConfigError, check_network_kwargs, count_parameters,
                                 state_shapes)
from edm2.networks import build_network, network_kwargs

pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
            attn_resolutions=[8], num_blocks=1, channels_per_head=8)


def _all_presets():
    table = presets.load('networks')
    return [(size, shape) for size in table['sizes'] for shape in table['shapes']]


@pytest.mark.parametrize('size,shape', _all_presets())
def test_published_presets_pass_with_their_parameter_count(size, shape):
    kwargs = network_kwargs(size, shape, dropout=0.1)
    count = check_network_kwargs(kwargs)
    with torch.device('meta'):
        net = build_network(kwargs)
    assert count == sum(p.numel() for p in net.parameters())
    assert 30e6 < count < DEFAULT_MAX_PARAMS


@pytest.mark.parametrize('overrides', [
    {}, dict(label_dim=0), dict(num_blocks=0), dict(channel_mult=[1]), dict(channel_mult_noise=2, channel_mult_emb=3),
    dict(img_resolution=4, channel_mult=[1, 1, 1]), dict(attn_resolutions=[]), dict(clip_act=None, use_fp16=False),
    dict(channel_mult=(1, 2), attn_resolutions=(16, 8)), dict(logvar_channels=7, dropout=0.5, resample_filter=[1, 1]),
])
def test_counts_equal_the_allocated_network(overrides):
    kwargs = dict(TINY, **overrides)
    net = build_network(kwargs)
    assert check_network_kwargs(kwargs) == sum(p.numel() for p in net.parameters())
    assert state_shapes(kwargs) == {name: tuple(t.shape) for name, t in net.state_dict().items()}


def test_checking_draws_no_random_numbers():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    check_network_kwargs(network_kwargs('xs', 'img64'))
    assert torch.equal(torch.rand(4), expected)


BAD = [
    # (overrides, field the message must name)
    (dict(model_channels=-8), 'model_channels'),
    (dict(model_channels=0), 'model_channels'),
    (dict(model_channels=16.0), 'model_channels'),
    (dict(model_channels=True), 'model_channels'),
    (dict(model_channels='16'), 'model_channels'),
    (dict(model_channels=10 ** 12), 'model_channels'),
    (dict(img_channels=0), 'img_channels'),
    (dict(img_channels=None), 'img_channels'),
    (dict(label_dim=-1), 'label_dim'),
    (dict(label_dim=10 ** 8), 'label_dim'),
    (dict(label_dim=2.5), 'label_dim'),
    (dict(img_resolution=24), 'img_resolution'),
    (dict(img_resolution=0), 'img_resolution'),
    (dict(img_resolution=-16), 'img_resolution'),
    (dict(img_resolution=16.0), 'img_resolution'),
    (dict(img_resolution=1 << 20), 'img_resolution'),
    (dict(channel_mult=[]), 'channel_mult'),
    (dict(channel_mult=[1, -2]), 'channel_mult'),
    (dict(channel_mult=[1, 0]), 'channel_mult'),
    (dict(channel_mult=2), 'channel_mult'),
    (dict(channel_mult='1,2'), 'channel_mult'),
    (dict(channel_mult=[1, 2.5]), 'channel_mult'),
    (dict(channel_mult=[1] * 6), 'channel_mult'),         # 16 px cannot be halved five times
    (dict(channel_mult=[1, 10 ** 6]), 'channel_mult'),
    (dict(channel_mult_noise=0), 'channel_mult_noise'),
    (dict(channel_mult_emb=-1), 'channel_mult_emb'),
    (dict(num_blocks=-1), 'num_blocks'),
    (dict(num_blocks=10 ** 6), 'num_blocks'),
    (dict(attn_resolutions=8), 'attn_resolutions'),
    (dict(attn_resolutions=[12]), 'attn_resolutions'),
    (dict(attn_resolutions=[-8]), 'attn_resolutions'),
    (dict(attn_resolutions=['8']), 'attn_resolutions'),
    (dict(channels_per_head=0), 'channels_per_head'),
    (dict(logvar_channels=0), 'logvar_channels'),
    (dict(logvar_channels=10 ** 9), 'logvar_channels'),
    (dict(dropout=1.0), 'dropout'),
    (dict(dropout=-0.1), 'dropout'),
    (dict(dropout=math.nan), 'dropout'),
    (dict(dropout='0.1'), 'dropout'),
    (dict(label_balance=1.5), 'label_balance'),
    (dict(concat_balance=-0.01), 'concat_balance'),
    (dict(res_balance=math.inf), 'res_balance'),
    (dict(attn_balance=math.nan), 'attn_balance'),
    (dict(sigma_data=0), 'sigma_data'),
    (dict(sigma_data=-0.5), 'sigma_data'),
    (dict(sigma_data=math.inf), 'sigma_data'),
    (dict(sigma_data=1e-300), 'sigma_data'),
    (dict(clip_act=-1), 'clip_act'),
    (dict(clip_act=math.inf), 'clip_act'),
    (dict(use_fp16='yes'), 'use_fp16'),
    (dict(use_fp16=1), 'use_fp16'),
    (dict(resample_filter=[1, 3, 3, 1]), 'resample_filter'),
    (dict(model_chanels=16), 'model_chanels'),             # a typo is not silently ignored
    (dict(flavor='enc'), 'flavor'),                       # per-block settings are not network arguments
]


@pytest.mark.parametrize('overrides,field', BAD, ids=[f'{f}-{i}' for i, (_, f) in enumerate(BAD)])
def test_bad_fields_are_refused_naming_the_field(overrides, field):
    with pytest.raises(NetworkConfigError) as info:
        check_network_kwargs(dict(TINY, **overrides))
    message = str(info.value)
    assert field in message and '\n' not in message and len(message) < 400
    assert isinstance(info.value, EDM2Error) and isinstance(info.value, ValueError)


@pytest.mark.parametrize('missing', ['img_resolution', 'img_channels'])
def test_required_fields(missing):
    kwargs = dict(TINY)
    del kwargs[missing]
    with pytest.raises(NetworkConfigError, match=f'{missing} is missing'):
        check_network_kwargs(kwargs)


@pytest.mark.parametrize('kwargs', [None, [('img_resolution', 16)], {1: 16}])
def test_arguments_must_be_a_dict_of_names(kwargs):
    with pytest.raises(NetworkConfigError, match='dict'):
        check_network_kwargs(kwargs)


def test_size_limit_refuses_without_allocating():
    # A header claiming model_channels=1024 describes ~8 billion parameters (32 GB in float32).
    huge = network_kwargs('xxl', 'img512', model_channels=1024)
    rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    with pytest.raises(NetworkConfigError, match='above the limit of 1,000,000,000') as info:
        check_network_kwargs(huge, max_params=10 ** 9)
    assert 'model_channels' in str(info.value)
    assert time.perf_counter() - start < 10
    assert psutil.Process().memory_info().rss - rss < 200 * 2 ** 20
    assert count_parameters(huge) > 7e9
    # No limit: the count alone, still without allocating.
    assert check_network_kwargs(huge, max_params=None) == count_parameters(huge)
    # The limit is inclusive.
    exact = count_parameters(TINY)
    assert check_network_kwargs(TINY, max_params=exact) == exact
    with pytest.raises(NetworkConfigError, match='limit'):
        check_network_kwargs(TINY, max_params=exact - 1)


def test_largest_fields_within_bounds_are_checked_quickly():
    # Every field at its upper bound: refused by the size limit, in seconds, with no allocation.
    extreme = dict(img_resolution=8192, img_channels=65536, label_dim=1 << 20, model_channels=65536,
                   channel_mult=[1024] * 14, num_blocks=64, channel_mult_emb=1024, attn_resolutions=[1, 2])
    start = time.perf_counter()
    with pytest.raises(NetworkConfigError, match='limit'):
        check_network_kwargs(extreme)
    assert time.perf_counter() - start < 30
