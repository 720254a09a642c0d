"""The fast path of the U-Net (edm2.runtime): reduced precision on any device, channels-last layout, fused
attention, torch.compile, and bf16 training with exact resume."""

import copy
import math
import pathlib
import signal

import pytest
import torch
import torch.nn.functional as F

from edm2 import runtime
from edm2.checkpoint import load_snapshot
from edm2.mp import normalize
from edm2.networks import Block, build_network, precond_coefficients
from edm2.training import loop
from edm2.training.options import TrainingError, TrainingOptions

pytestmark = pytest.mark.usefixtures('one_thread')

# The network configurations the other tests use (tests/test_networks.py, test_generate.py, test_train*.py).
CONFIGS = {
    'attention': dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                      attn_resolutions=[8], num_blocks=1, channels_per_head=8),
    'generate': dict(img_resolution=8, img_channels=3, label_dim=4, model_channels=8, channel_mult=[1], num_blocks=1,
                     attn_resolutions=[]),
    'unconditional': dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
                          num_blocks=1, attn_resolutions=[]),
    'latent': dict(img_resolution=8, img_channels=4, label_dim=3, model_channels=16, channel_mult=[1, 2],
                   num_blocks=1, attn_resolutions=[4], channels_per_head=8, dropout=0.1),
}
# Unit roundoff of each precision: bounds below are this times a small factor for the depth of the network.
UNIT_ROUNDOFF = {'bf16': 2.0 ** -8, 'fp16': 2.0 ** -11}


def _net(config, seed=0):
    torch.manual_seed(seed)
    net = build_network(dict(CONFIGS[config]) if isinstance(config, str) else config)
    with torch.no_grad():  # fresh nets have zero gains (F == 0); give them non-trivial values
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7 if 'emb_gain' in name else 1.3)
    return net


def _inputs(net, n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    res, ch = net.img_resolution, net.img_channels
    x = torch.randn(n, ch, res, res, generator=g) * 2
    sigma = torch.exp(torch.randn(n, generator=g))
    labels = torch.eye(net.label_dim)[torch.randint(net.label_dim, (n,), generator=g)] if net.label_dim else None
    return x, sigma, labels


def _denoise(net, x, sigma, labels, dtype):
    """D(x; σ) = c_skip x + c_out F(c_in x) (EDM paper eq. 7) with the U-Net evaluated in `dtype` directly,
    bypassing Precond's casts: in float64 the reference the other precisions are judged against (only the
    Fourier features of the noise level stay float32)."""
    x, sigma = x.to(dtype), sigma.to(dtype).reshape(-1, 1, 1, 1)
    coef = precond_coefficients(sigma, net.sigma_data)
    unet = net.unet.to(dtype)
    try:
        with runtime.running(runtime.RunSettings(channels_last=False)):
            f = unet(coef.c_in * x, coef.c_noise.flatten(), None if labels is None else labels.to(dtype))
    finally:
        unet.float()
    return coef.c_skip * x + coef.c_out * f


def _float64(net, x, sigma, labels):
    with torch.no_grad():
        return _denoise(net, x, sigma, labels, torch.float64).to(torch.float32)


def _fp16_supported():
    try:
        F.conv2d(torch.ones(1, 2, 3, 3, dtype=torch.float16), torch.ones(2, 2, 3, 3, dtype=torch.float16), padding=1)
        F.scaled_dot_product_attention(*[torch.ones(1, 1, 4, 8, dtype=torch.float16)] * 3)
        return True
    except RuntimeError:
        return False


def _precisions():
    reason = 'this torch build has no float16 convolution or attention on the CPU'
    return ['bf16', pytest.param('fp16', marks=pytest.mark.skipif(not _fp16_supported(), reason=reason))]


def test_precision_applies_on_the_cpu_only_when_the_run_names_one():
    net = _net('attention').eval()
    net.precision = 'fp16'  # the published rule: float16 on CUDA only
    assert net.unet_dtype('cpu') == torch.float32
    for name, dtype in runtime.PRECISIONS.items():
        with runtime.running(runtime.RunSettings(precision=name)):
            assert net.unet_dtype('cpu') == dtype and net.unet_dtype('cuda') == dtype
            assert net.unet_dtype('cpu', force_fp32=True) == torch.float32
    with pytest.raises(ValueError, match='precision must be one of fp32, fp16, bf16 or None'):
        runtime.RunSettings(precision='fp8')


@pytest.mark.parametrize('precision', _precisions())
@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_reduced_precision_forward_and_backward(config, precision):
    """D in bf16/fp16 within a few units of that precision's roundoff of the float64 result; gradients of every
    parameter finite and pointing the way the float32 gradients point; D, u(σ) and the gradients float32."""
    net = _net(config).train()
    x, sigma, labels = _inputs(net)
    expected = _float64(net.eval(), x, sigma, labels)
    with torch.no_grad(), runtime.running(runtime.RunSettings(precision=precision)):
        got = net.eval()(x, sigma, labels)
    assert got.dtype == torch.float32
    scale = expected.abs().max()
    assert (got - expected).abs().max() <= 16 * UNIT_ROUNDOFF[precision] * scale

    def grads(settings):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout mask in both runs
        with runtime.running(settings):
            denoised, logvar = net.train()(x, sigma, labels, return_logvar=True)
        assert denoised.dtype == logvar.dtype == torch.float32
        ((denoised - x).square().mean() + logvar.mean()).backward()
        return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}

    reference, reduced = grads(runtime.RunSettings(precision='fp32')), grads(runtime.RunSettings(precision=precision))
    assert reduced.keys() == reference.keys() and reduced
    for name, g in reduced.items():
        assert g.dtype == torch.float32 and torch.isfinite(g).all(), name
        ref = reference[name]
        if ref.norm() > 1e-6:
            cosine = float((g * ref).sum() / (g.norm() * ref.norm()))
            assert cosine > 0.98, (name, cosine)


@pytest.mark.parametrize('config', sorted(CONFIGS))
def test_channels_last_changes_only_the_layout(config):
    """Channels-last against the default layout, in training mode, gradients included: as close to the float64
    result as the default layout is (only the summation order of the convolutions may differ)."""
    net = _net(config)
    x, sigma, labels = _inputs(net)

    def run(settings, dtype=torch.float32):
        net.zero_grad(set_to_none=True)
        torch.manual_seed(5)  # the same dropout mask
        with runtime.running(settings):
            d = _denoise(net.train(), x, sigma, labels, dtype) if dtype == torch.float64 else net(x, sigma, labels)
        d.square().mean().backward()
        return [d.detach().double()] + [p.grad.double() for p in net.unet.parameters() if p.grad is not None]

    exact = run(runtime.RunSettings(channels_last=False), torch.float64)
    default = run(runtime.RunSettings(channels_last=False))
    nhwc = run(runtime.RunSettings(channels_last=True))
    assert len(exact) == len(default) == len(nhwc)
    for e, a, b in zip(exact, default, nhwc):
        if e.norm() == 0:
            continue
        error_default, error_nhwc = (a - e).norm() / e.norm(), (b - e).norm() / e.norm()
        # Rounding errors of long sums (the scalar gains' gradients) vary with the order by a few times.
        assert error_nhwc <= 8 * max(error_default, 8 * 2 ** -24)


def _explicit_attention(block, x):
    """Block's attention output written out: softmax(q kᵀ / √d) v per head, q/k/v from attn_qkv in the layout
    [head, channel, (q, k, v)], normalised per pixel; then attn_proj."""
    n, c, h, w = x.shape
    d = c // block.num_heads
    qkv = block.attn_qkv(x).reshape(n, block.num_heads, d, 3, h * w)
    qkv = normalize(qkv, dim=2)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]            # [n, head, channel, pixel]
    weights = torch.softmax(torch.einsum('nhcp,nhcq->nhpq', q, k) / math.sqrt(d), dim=-1)
    mixed = torch.einsum('nhpq,nhcq->nhcp', weights, v).reshape(n, c, h, w)
    return block.attn_proj(mixed)


@pytest.mark.parametrize('channels_last', [False, True])
def test_fused_attention_equals_the_explicit_formula(channels_last):
    torch.manual_seed(0)
    block = Block(32, 32, emb_channels=16, attention=True, channels_per_head=8).eval()
    x = torch.randn(3, 32, 8, 8)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        got, expected = block._attention_branch(x), _explicit_attention(block, x.contiguous())
    assert (got - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_identity_attention_is_exact():
    """self:pag replaces the attention weights by the identity: the branch is attn_proj(v), bit for bit."""
    torch.manual_seed(0)
    block = Block(32, 32, emb_channels=16, attention=True, channels_per_head=8).eval()
    x = torch.randn(2, 32, 4, 4)
    n, c, h, w = x.shape
    with torch.no_grad():
        qkv = normalize(block.attn_qkv(x).reshape(n, 4, 8, 3, h * w), dim=2)
        v = qkv[:, :, :, 2].reshape(n, c, h, w)
        expected = block.attn_proj(v)
        got = block._attention_branch(x, identity=True)
    assert torch.equal(got, expected)


def test_published_networks_in_bf16(official):
    """The fixture networks of the release in bf16: D within bf16 rounding of float32, on the CPU."""
    for name in ('main-rgb16.pkl', 'guide-rgb16.pkl'):
        net = load_snapshot(official(name))[0].eval()
        x, sigma, labels = _inputs(net, n=3)
        with torch.no_grad():
            full = net(x, sigma, labels)
            with runtime.running(runtime.RunSettings(precision='bf16')):
                half = net(x, sigma, labels)
        assert 0 < (half - full).abs().max() <= 16 * UNIT_ROUNDOFF['bf16'] * full.abs().max()


@pytest.mark.slow
def test_compiled_forward_equals_eager():
    """torch.compile (inductor: C++ on the CPU) of the U-Net against eager: within 1e-5 relative."""
    net = _net('attention').eval()
    compiled = copy.deepcopy(net)
    x, sigma, labels = _inputs(net)
    with torch.no_grad():
        eager = net(x, sigma, labels)
        reports = []
        with runtime.running(runtime.RunSettings(compile=True, report=reports.append)):
            got = compiled(x, sigma, labels)
            again = compiled(x, sigma, labels)
    assert (got - eager).abs().max() <= 1e-5 * eager.abs().max()
    assert torch.equal(got, again)
    assert compiled.state_dict().keys() == net.state_dict().keys()
    assert len(reports) <= 1 and runtime.compile_seconds() is not None


# ----------------------------------------------------------------------------------------------------
# Training: bf16 on the CPU, checkpoint/resume bit for bit; a compiled run resumes an eager one and back.

def _dataset(root):
    from helpers import make_shapes  # tests/ is on sys.path under pytest
    return make_shapes(root, n=24)


def _train(outdir, data, stop_at=None, **overrides):
    """32 images in steps of 8; `stop_at`: stop there as on SIGTERM (checkpoint written, no snapshot)."""
    opts = TrainingOptions(outdir=str(outdir), data=str(data), duration=32, batch=8, channels=8, lr=0.02,
                           decay=0, rampup=0, status=8, snapshot=0, checkpoint=8, workers=0, device='cpu',
                           dropout=0.1, network=dict(channel_mult=[1, 2], num_blocks=1, attn_resolutions=[]),
                           **overrides)

    def stop(cur_nimg):
        if cur_nimg == stop_at:
            signal.raise_signal(signal.SIGTERM)
    loop.training_loop(opts, step_callback=stop)
    files = sorted(pathlib.Path(outdir).glob('training-state-*.pt'))
    return torch.load(files[-1], weights_only=True)


def _assert_states_equal(a, b):
    assert a['cur_nimg'] == b['cur_nimg']
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for ema_a, ema_b in zip(a['ema']['emas'], b['ema']['emas']):
        assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)


@pytest.mark.slow
def test_bf16_training_resumes_bit_for_bit(tmp_path):
    data = _dataset(tmp_path / 'data')
    bf16 = dict(precision='bf16', precision_scope='all')
    straight = _train(tmp_path / 'straight', data, **bf16)
    _train(tmp_path / 'resumed', data, stop_at=16, **bf16)
    resumed = _train(tmp_path / 'resumed', data, **bf16)
    _assert_states_equal(straight, resumed)
    # bf16 really ran: the float32 run of the same settings ends elsewhere; the parameters stay float32.
    fp32 = _train(tmp_path / 'fp32', data, precision='fp32', precision_scope='all')
    assert all(v.dtype == torch.float32 for v in straight['net'].values() if v.is_floating_point())
    assert any(not torch.equal(straight['net'][k], fp32['net'][k]) for k in fp32['net'])
    # A bf16 run cannot be resumed as another precision: the recorded setting is refused.
    _train(tmp_path / 'refused', data, stop_at=8, **bf16)
    with pytest.raises(TrainingError, match="precision: 'bf16' -> 'fp32'"):
        _train(tmp_path / 'refused', data, precision='fp32', precision_scope='all')


@pytest.mark.slow
def test_compiled_training_resumes_eager_and_back(tmp_path):
    """--compile is not a setting of the result: an eager run resumes compiled and the reverse, the checkpoints
    keep their keys, and the runs stay within float32 rounding of the eager one (aot_eager backend: the
    compiled forward and backward graphs without inductor's C++ build, which the test above covers)."""
    data = _dataset(tmp_path / 'data')
    eager = _train(tmp_path / 'eager', data)
    _train(tmp_path / 'a', data, stop_at=16)
    a = _train(tmp_path / 'a', data, compile='aot_eager')
    _train(tmp_path / 'b', data, stop_at=16, compile='aot_eager')
    b = _train(tmp_path / 'b', data)
    for state in (a, b):
        assert state['net'].keys() == eager['net'].keys()
        for key, value in eager['net'].items():
            assert (state['net'][key] - value).abs().max() <= 1e-4 * max(float(value.abs().max()), 1.0), key


# ----------------------------------------------------------------------------------------------------
# The flags of the commands.

@pytest.mark.slow
def test_generate_precision_flag_runs_the_network_in_bf16(tmp_path):
    """--precision bf16 on the CPU: the images differ from float32 ones (bf16 really ran) but only by a few
    levels; without the flag the CPU images are float32 ones, bit for bit."""
    import numpy as np
    import PIL.Image
    from click.testing import CliRunner

    from edm2.checkpoint import save_network
    from edm2.commands import generate_images
    from edm2.encoders import StandardRGBEncoder
    path = str(tmp_path / 'net.safetensors')
    save_network(path, _net('attention').eval(), StandardRGBEncoder())

    def images(*flags):
        out = tmp_path / f'out{len(list(tmp_path.iterdir()))}'
        result = CliRunner().invoke(generate_images.main, ['--net', path, '--seeds', '0-3', '--steps', '8',
                                                           '--outdir', str(out), *flags])
        assert result.exit_code == 0, result.output
        return np.stack([np.array(PIL.Image.open(p)) for p in sorted(out.glob('*.png'))]).astype(int)

    fp32, default, bf16 = images('--precision', 'fp32'), images(), images('--precision', 'bf16')
    assert np.array_equal(fp32, default)
    diff = np.abs(bf16 - fp32)
    assert diff.max() > 0 and np.mean(diff <= 8) > 0.95


def test_train_precision_flag_is_recorded_with_its_scope(tmp_path):
    from click.testing import CliRunner

    from edm2.commands import train_edm2
    data = _dataset(tmp_path / 'data')
    base = ['--outdir', str(tmp_path / 'run'), '--data', str(data), '--duration', '64', '--batch', '8', '--dry-run']
    for flags, precision, scope in ([[], 'fp16', 'cuda'], [['--fp16', '0'], 'fp32', 'cuda'],
                                    [['--precision', 'bf16', '--compile'], 'bf16', 'all']):
        result = CliRunner().invoke(train_edm2.main, base + flags)
        assert result.exit_code == 0, result.output
        assert f'"precision": "{precision}"' in result.output and f'"precision_scope": "{scope}"' in result.output
    assert '"compile": true' in result.output
