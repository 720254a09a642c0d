"""Block / UNet / Precond (EDM2 paper config G; EDM paper Table 1), size presets, and parity with the
published release."""

import copy
import math

import pytest
import torch

from edm2 import presets
from edm2.checkpoint import load_network, load_snapshot
from edm2.mp import MPConv, mp_sum, normalize
from edm2.networks import Block, Precond, build_network, network_kwargs, precond_coefficients
from edm2.training.loss import edm_weight


pytestmark = pytest.mark.usefixtures('one_thread')

TINY = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
            attn_resolutions=[8], num_blocks=1, channels_per_head=8)


def _tiny(**overrides):
    torch.manual_seed(0)
    net = build_network(dict(TINY, **overrides)).eval()
    # Fresh nets have zero output / embedding gains (F == 0); give them non-trivial values.
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim == 0:
                p.fill_(0.7 if 'emb_gain' in name else 1.3)
    return net


# ------------------------------------------------------------------------------------------------
# Size presets.

PUBLISHED_IMG512_PARAMS = {'xs': 125e6, 's': 280e6, 'm': 498e6, 'l': 777e6, 'xl': 1119e6, 'xxl': 1523e6}


@pytest.mark.parametrize('size', sorted(PUBLISHED_IMG512_PARAMS))
def test_size_presets_have_published_parameter_counts(size):
    with torch.device('meta'):  # no memory is allocated
        net = build_network(size, 'img512')
    count = sum(p.numel() for p in net.parameters())
    assert abs(count / PUBLISHED_IMG512_PARAMS[size] - 1) < 0.01, f'{size}: {count:,} parameters'
    assert net.unet.enc['64x64_conv'].weight.shape[1] == 4 + 1  # latents + the constant channel
    assert net.label_dim == 1000


def test_network_kwargs_come_from_the_config():
    table = presets.load('networks')
    assert network_kwargs('xxs', 'img64')['model_channels'] == table['sizes']['xxs'] == 64
    kw = network_kwargs('S', 'img64', dropout=0.1, label_dim=0)
    assert (kw['img_resolution'], kw['img_channels'], kw['label_dim'], kw['dropout']) == (64, 3, 0, 0.1)
    assert kw['channel_mult'] == [1, 2, 3, 4] and kw['attn_resolutions'] == [16, 8]
    with pytest.raises(presets.PresetError, match='xxxl'):
        network_kwargs('xxxl', 'img512')
    with pytest.raises(presets.PresetError, match='img1024'):
        network_kwargs('xs', 'img1024')


def test_state_dict_names_follow_the_published_layout():
    net = build_network(dict(TINY, attn_resolutions=[16, 8], num_blocks=2))
    keys = set(net.state_dict())
    expected = {
        'logvar_fourier.freqs', 'logvar_fourier.phases', 'logvar_linear.weight',
        'unet.out_gain', 'unet.emb_fourier.freqs', 'unet.emb_noise.weight', 'unet.emb_label.weight',
        'unet.enc.16x16_conv.weight', 'unet.enc.16x16_block1.attn_qkv.weight',
        'unet.enc.8x8_down.conv_res0.weight', 'unet.enc.8x8_down.emb_gain', 'unet.enc.8x8_block0.conv_skip.weight',
        'unet.dec.8x8_in0.attn_qkv.weight', 'unet.dec.8x8_in0.attn_proj.weight', 'unet.dec.8x8_in1.conv_res1.weight',
        'unet.dec.16x16_up.emb_linear.weight', 'unet.dec.16x16_block2.conv_skip.weight', 'unet.out_conv.weight',
    }
    assert expected <= keys
    assert 'unet.enc.8x8_down.attn_qkv.weight' not in keys  # resampling blocks have no attention
    assert 'unet.dec.8x8_in1.attn_qkv.weight' not in keys
    assert list(net.unet.enc) == ['16x16_conv', '16x16_block0', '16x16_block1', '8x8_down', '8x8_block0', '8x8_block1']
    assert list(net.unet.dec) == ['8x8_in0', '8x8_in1', '8x8_block0', '8x8_block1', '8x8_block2',
                                  '16x16_up', '16x16_block0', '16x16_block1', '16x16_block2']
    # Decoder blocks take the current width plus the skip's width.
    assert net.unet.dec['8x8_block0'].conv_res0.weight.shape[1] == 32 + 32
    assert net.unet.dec['8x8_block2'].conv_res0.weight.shape[1] == 32 + 16  # skip of 8x8_down (16 wide)
    assert net.unet.dec['16x16_block0'].conv_res0.weight.shape[1] == 32 + 16  # 16x16_up + skip of 16x16_block1
    assert net.unet.dec['16x16_block2'].conv_res0.weight.shape[1] == 16 + 16
    # Unconditional: no label embedding.
    assert 'unet.emb_label.weight' not in build_network(dict(TINY, label_dim=0)).state_dict()


def test_init_kwargs_rebuild_the_same_architecture():
    net = _tiny(dropout=0.1)
    import json
    kwargs = json.loads(json.dumps(net.init_kwargs))
    clone = Precond(**kwargs)
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    assert kwargs['dropout'] == 0.1 and kwargs['use_fp16'] is True


# ------------------------------------------------------------------------------------------------
# Precond behaviour.

def test_preconditioning_formula():
    net = _tiny()
    F_out = torch.randn(3, 3, 16, 16)

    class Stub(torch.nn.Module):
        def forward(self, x, noise_labels, class_labels, perturbation=None):
            self.args = (x, noise_labels, class_labels)
            return F_out

    net.unet = Stub()
    x = torch.randn(3, 3, 16, 16)
    sigma = torch.tensor([0.01, 0.5, 20.0])
    D = net(x, sigma)
    s = sigma.double().reshape(-1, 1, 1, 1)
    sd = 0.5
    expected = sd ** 2 / (s ** 2 + sd ** 2) * x.double() + s * sd / (s ** 2 + sd ** 2).sqrt() * F_out.double()
    torch.testing.assert_close(D.double(), expected, rtol=1e-6, atol=1e-6)
    x_in, c_noise, labels = net.unet.args
    torch.testing.assert_close(x_in, (x.double() / (s ** 2 + sd ** 2).sqrt()).float())
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    assert torch.equal(labels, torch.zeros(3, 10))  # labels omitted -> all-zero rows


def test_precond_coefficients_satisfy_the_edm_identities():
    # EDM paper, appendix B.6: c_in gives the network unit-variance input, and c_out and c_skip give
    # its training target (y - c_skip (y + n)) / c_out unit variance, for data of std sigma_data and
    # noise of std sigma.
    sigma = torch.logspace(-3, 2.5, 50, dtype=torch.float64)
    for sd in (0.5, 1.0, 0.1):
        c = precond_coefficients(sigma, sd)
        torch.testing.assert_close(c.c_in ** 2 * (sigma ** 2 + sd ** 2), torch.ones_like(sigma))
        target_var = ((1 - c.c_skip) ** 2 * sd ** 2 + c.c_skip ** 2 * sigma ** 2) / c.c_out ** 2
        torch.testing.assert_close(target_var, torch.ones_like(sigma))
        # c_skip minimises that variance: its derivative in c_skip vanishes.
        torch.testing.assert_close(-(1 - c.c_skip) * sd ** 2 + c.c_skip * sigma ** 2, torch.zeros_like(sigma))
        torch.testing.assert_close(c.c_noise, sigma.log() / 4)
        # The loss weight lambda(sigma) is 1 / c_out^2 (EDM paper, Table 1).
        torch.testing.assert_close(edm_weight(sigma, sd), 1 / c.c_out ** 2)
    assert precond_coefficients(torch.tensor([0.3]), 0.5).c_skip.dtype == torch.float32


def test_conditional_and_unconditional_labels():
    net = _tiny()
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([0.3, 2.0])
    labels = torch.nn.functional.one_hot(torch.tensor([1, 7]), 10).float()
    with torch.no_grad():
        d_none = net(x, sigma)
        d_zero = net(x, sigma, torch.zeros(2, 10))
        d_lab = net(x, sigma, labels)
        D, logvar = net(x, sigma, labels, return_logvar=True)
    assert torch.equal(d_none, d_zero)
    assert (d_lab - d_none).abs().max() > 1e-3  # the labels matter
    assert torch.equal(D, d_lab) and logvar.shape == (2, 1, 1, 1)
    # A scalar sigma applies to the whole batch.
    with torch.no_grad():
        torch.testing.assert_close(net(x, 0.3, labels)[:1], net(x[:1], torch.tensor([0.3]), labels[:1]))
    # An unconditional net ignores labels.
    unc = _tiny(label_dim=0)
    with torch.no_grad():
        assert torch.equal(unc(x, sigma), unc(x, sigma, labels))


def test_cpu_runs_in_float32_whatever_the_precision():
    net = _tiny()
    x = torch.randn(2, 3, 16, 16)
    outs = []
    for precision in ('fp16', 'bf16', 'fp32'):
        net.precision = precision
        with torch.no_grad():
            outs.append(net(x, torch.tensor([1.0, 3.0])))
        assert outs[-1].dtype == torch.float32
    with torch.no_grad():
        outs.append(net(x, torch.tensor([1.0, 3.0]), force_fp32=True))
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert net.unet_dtype('cuda') == torch.float32 and net.unet_dtype('cuda', force_fp32=True) == torch.float32
    net.precision = 'bf16'
    assert net.unet_dtype('cuda') == torch.bfloat16 and net.unet_dtype('cuda', force_fp32=True) == torch.float32
    net.precision = 'fp8'
    with pytest.raises(ValueError, match='fp8'):
        net.unet_dtype('cuda')


def test_dropout_only_in_training():
    net = _tiny(dropout=0.5)
    x = torch.randn(2, 3, 16, 16)
    sigma = torch.tensor([1.0, 1.0])
    with torch.no_grad():
        e1, e2 = net(x, sigma), net(x, sigma)
        assert torch.equal(e1, e2)
        train = copy.deepcopy(net).train()
        torch.manual_seed(1)
        t1 = train(x, sigma)
        torch.manual_seed(2)
        t2 = train(x, sigma)
        torch.manual_seed(1)
        t1_again = train(x, sigma)
    assert (t1 - t2).abs().max() > 1e-3
    # Same seed, same mask: the difference to e1 comes from dropout, not from forced weight normalisation.
    torch.testing.assert_close(t1, t1_again, rtol=2e-4, atol=2e-4)
    no_dropout = copy.deepcopy(net)
    for m in no_dropout.modules():
        if isinstance(m, Block):
            m.dropout = 0
    with torch.no_grad():
        t0 = no_dropout.train()(x, sigma)
    # Without dropout, training mode differs from eval only by the eps of forced normalisation.
    torch.testing.assert_close(t0, e1, rtol=1e-3, atol=1e-3 * e1.abs().max().item())


def test_training_mode_forces_unit_weights_and_backpropagates():
    net = _tiny()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, MPConv):
                m.weight.mul_(3)
    net.train()
    x = torch.randn(2, 3, 16, 16)
    D, logvar = net(x, torch.tensor([0.5, 5.0]), return_logvar=True)
    (D.square().mean() + logvar.mean()).backward()
    for name, m in net.named_modules():
        if isinstance(m, MPConv):
            rms = m.weight.detach().double().pow(2).mean(dim=list(range(1, m.weight.ndim))).sqrt()
            # normalize(w) has RMS r / (eps + r) with r >= 1 here: within [1 - eps, 1].
            assert ((rms > 1 - 1e-4 - 1e-6) & (rms <= 1 + 1e-6)).all(), name
            assert m.weight.grad is not None, name
    assert net.unet.out_gain.grad is not None


def _reference_attention(block, x):
    """Self-attention with unit-RMS q, k, v per head, written out head by head with explicit loops."""
    n, c, h, w = x.shape
    qkv = block.attn_qkv(x).reshape(n, c * 3, h * w)
    heads = block.num_heads
    ch = c // heads
    out = torch.empty(n, c, h * w)
    for i in range(n):
        for head in range(heads):
            # channel index of (head, channel, which) in the 1x1 conv output: ((head*ch)+channel)*3+which
            rows = lambda which: [(head * ch + j) * 3 + which for j in range(ch)]  # noqa: E731
            q, k, v = (qkv[i, rows(which)] for which in range(3))
            q, k, v = normalize(q, dim=0), normalize(k, dim=0), normalize(v, dim=0)
            weights = torch.softmax(q.t() @ k / math.sqrt(ch), dim=1)  # [query pixels, key pixels]
            out[i, head * ch:(head + 1) * ch] = v @ weights.t()
    y = block.attn_proj(out.reshape(n, c, h, w))
    return mp_sum(x, y, t=block.attn_balance)


@pytest.mark.parametrize('res', [4, 8, 16])
def test_attention_matches_an_explicit_reference(res):
    torch.manual_seed(res)
    block = Block(32, 32, 16, flavor='dec', attention=True, channels_per_head=8).eval()
    assert block.num_heads == 4
    x = torch.randn(2, 32, res, res)
    emb = torch.randn(2, 16)
    # Run the block with the residual branch disabled (res_balance 0 keeps x) to isolate attention.
    block.res_balance = 0
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), _reference_attention(block, x), rtol=1e-4, atol=1e-5)


def test_attention_resolutions_select_blocks():
    net = build_network(dict(TINY, img_resolution=32, channel_mult=[1, 1, 1, 1], attn_resolutions=[32, 16, 4]))
    with_attn = {name for name, m in net.unet.enc.items() if isinstance(m, Block) and m.num_heads > 0}
    assert with_attn == {'32x32_block0', '16x16_block0', '4x4_block0'}
    dec_attn = {name for name, m in net.unet.dec.items() if m.num_heads > 0}
    assert dec_attn == {'4x4_in0', '4x4_block0', '4x4_block1', '16x16_block0', '16x16_block1',
                        '32x32_block0', '32x32_block1'}
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 32, 32), torch.tensor([1.0])).shape == (1, 3, 32, 32)


# ------------------------------------------------------------------------------------------------
# Parity with the published release (fixtures from tests/fixtures/official).

def test_published_parity_main(official):
    ref = torch.load(official('main-rgb16-denoise.pt'), weights_only=True)
    net = load_network(official('main-rgb16.pkl'))
    assert not net.training and all(p.dtype == torch.float32 for p in net.parameters())
    # The release runs the float16-stored parameters as they are: gain / sqrt(fan_in) is rounded to
    # float16, everything else is float32. The importer reproduces that (gain_precision 'fp16').
    assert net.gain_precision == 'fp16'
    scale = ref['D'].abs().max().item()
    with torch.no_grad():
        D, logvar = net(ref['x'], ref['sigma'], ref['labels'], return_logvar=True)
        D_omitted = net(ref['x'], ref['sigma'])
    assert (D - ref['D']).abs().max().item() <= 1e-5 * scale
    assert (D_omitted - ref['D_labels_omitted']).abs().max().item() <= 1e-5 * scale
    assert (logvar - ref['logvar']).abs().max().item() <= 1e-5 * ref['logvar'].abs().max().item()
    # Plain float32 gains differ only by that rounding: half a float16 ulp (2^-11 relative) on each of
    # the gains, which bounds the change of D well below 2^-11 x max|D| -- and is still visible.
    net.gain_precision = None
    with torch.no_grad():
        D32 = net(ref['x'], ref['sigma'], ref['labels'])
    assert 1e-5 * scale < (D32 - ref['D']).abs().max().item() <= 2 ** -11 * scale
    # The same network in half-precision storage (what the release holds) gives the same numbers.
    half = copy.deepcopy(net).half()
    with torch.no_grad():
        torch.testing.assert_close(half(ref['x'], ref['sigma'], ref['labels']), D, rtol=0, atol=1e-6 * scale)


def test_published_guide_shapes(official):
    net, encoder, meta = load_snapshot(official('guide-rgb16.pkl'))
    assert (net.img_resolution, net.img_channels, net.label_dim) == (16, 3, 10)
    assert net.init_kwargs['model_channels'] == 16 and net.init_kwargs['channel_mult'] == [1, 2]
    assert net.unet.enc['16x16_conv'].weight.shape == (16, 4, 3, 3)
    assert net.unet.dec['8x8_in0'].attn_qkv is None  # 32 channels < channels_per_head 64: no heads
    assert net.unet.dec['8x8_block3'].conv_res0.weight.shape == (32, 48, 3, 3)
    assert encoder.spec() == {'class': 'StandardRGBEncoder'}
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert net(x, torch.tensor([1.0, 2.0])).shape == (2, 3, 16, 16)
