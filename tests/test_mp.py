"""Magnitude-preserving primitives (EDM2 paper configs D-G): exact identities and unit-variance behaviour.

Statistical checks use n samples and allow 6 standard errors of the estimated mean square
(sqrt(Var[y^2] / n)), so they fail by chance with probability < 1e-8.
"""

import math

import pytest
import torch
from scipy import integrate

from edm2.mp import MPConv, MPFourier, mp_cat, mp_silu, mp_sum, normalize, resample


pytestmark = pytest.mark.usefixtures('one_thread')


def _check_unit_mean_square(y, what):
    y = y.double().flatten()
    ms = y.pow(2).mean().item()
    se = (y.pow(2).var().item() / y.numel()) ** 0.5
    assert abs(ms - 1) < 6 * se, f'{what}: mean square {ms:.4f}, expected 1 +- {6 * se:.4f}'


def test_normalize_gives_unit_rms_per_group():
    torch.manual_seed(0)
    x = torch.randn(5, 7, 3, 3) * torch.tensor([0.01, 1, 30, 2, 5]).reshape(-1, 1, 1, 1)
    y = normalize(x)
    rms_in = x.double().pow(2).mean(dim=[1, 2, 3]).sqrt()
    rms_out = y.double().pow(2).mean(dim=[1, 2, 3]).sqrt()
    # y = x / (eps + rms) exactly, up to float32 rounding (a few ulps).
    torch.testing.assert_close(rms_out, rms_in / (1e-4 + rms_in), rtol=1e-6, atol=0)
    # Along a chosen axis (the pixel norm of encoder blocks): every pixel vector gets unit RMS.
    z = normalize(x, dim=1)
    torch.testing.assert_close(z.double().pow(2).mean(dim=1).sqrt(),
                               (lambda r: r / (1e-4 + r))(x.double().pow(2).mean(dim=1).sqrt()), rtol=1e-6, atol=0)


def test_normalize_computes_in_float32_for_half_input():
    x = torch.full([2, 4096], 300.0, dtype=torch.float16)  # ||x|| = 19200 overflows nothing, sum of squares would in fp16
    y = normalize(x)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y.float(), torch.ones(2, 4096), rtol=2e-3, atol=0)


def test_mp_silu_constant_is_the_rms_of_silu_under_a_unit_normal():
    pdf = lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    second_moment = integrate.quad(lambda t: (t / (1 + math.exp(-t))) ** 2 * pdf(t), -40, 40)[0]
    assert abs(math.sqrt(second_moment) - 0.596) < 5e-4  # 0.596 is the value rounded to 3 digits
    torch.manual_seed(1)
    x = torch.randn(50_000)
    y = mp_silu(x)
    assert torch.equal(y, torch.nn.functional.silu(x) / 0.596)
    # Relative to the exact constant the mean square is (0.5962.../0.596)^2, within 2e-3 of 1.
    ms = y.double().pow(2).mean().item()
    se = (y.double().pow(2).var().item() / y.numel()) ** 0.5
    assert abs(ms - second_moment / 0.596 ** 2) < 6 * se


@pytest.mark.parametrize('t', [0.0, 0.3, 0.5, 0.9])
def test_mp_sum_preserves_unit_variance(t):
    torch.manual_seed(2)
    a, b = torch.randn(2, 50_000)
    y = mp_sum(a, b, t)
    torch.testing.assert_close(y, ((1 - t) * a + t * b) / math.sqrt((1 - t) ** 2 + t ** 2))
    _check_unit_mean_square(y, f'mp_sum t={t}')


@pytest.mark.parametrize('t', [0.2, 0.5, 0.8])
def test_mp_cat_weights_and_total_magnitude(t):
    torch.manual_seed(3)
    a = normalize(torch.randn(2, 6, 4, 4), dim=[1, 2, 3], eps=0)
    b = normalize(torch.randn(2, 10, 4, 4), dim=[1, 2, 3], eps=0)
    y = mp_cat(a, b, dim=1, t=t)
    assert y.shape == (2, 16, 4, 4)
    # a keeps weight (1-t), b weight t, relative to their sizes; the whole has unit RMS exactly.
    C = math.sqrt(16 / ((1 - t) ** 2 + t ** 2))
    torch.testing.assert_close(y[:, :6], a * C / math.sqrt(6) * (1 - t))
    torch.testing.assert_close(y[:, 6:], b * C / math.sqrt(10) * t)
    torch.testing.assert_close(y.pow(2).mean(dim=[1, 2, 3]), torch.ones(2), rtol=1e-5, atol=0)


def test_mp_fourier_unit_rms_and_float32_compute():
    torch.manual_seed(4)
    emb = MPFourier(8192)
    x = torch.tensor([-2.0, -0.3, 0.0, 0.7, 5.0])
    y = emb(x)
    assert y.shape == (5, 8192)
    expected = math.sqrt(2) * torch.cos(x[:, None].double() * emb.freqs.double() + emb.phases.double())
    torch.testing.assert_close(y.double(), expected, atol=1e-4, rtol=0)  # float32 phase of |arg| < 200
    for row in y:  # cos of a uniform random phase: E[2 cos^2] = 1
        _check_unit_mean_square(row, 'MPFourier')
    assert emb(x.half()).dtype == torch.float16


@pytest.mark.parametrize('kernel', [[], [1, 1], [3, 3]])
def test_mpconv_preserves_unit_variance(kernel):
    torch.manual_seed(5)
    conv = MPConv(48, 32, kernel).eval()
    if kernel:
        x = torch.randn(16, 48, 12, 12)
        y = conv(x)
        assert y.shape == (16, 32, 12, 12)
        k = kernel[0] // 2
        y = y[:, :, k:12 - k, k:12 - k]  # zero padding lowers the variance at the border
    else:
        x = torch.randn(4096, 48)
        y = conv(x)
    # Each output channel has a unit-RMS weight row scaled by 1/sqrt(fan_in): unit variance out
    # (minus the eps of normalize, 1e-4 relative).
    _check_unit_mean_square(y, f'MPConv kernel={kernel}')
    # The gain scales the output; a tensor gain receives gradients.
    gain = torch.tensor(0.5, requires_grad=True)
    out = conv(x, gain=gain)
    torch.testing.assert_close(out, conv(x) * 0.5, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert gain.grad is not None and gain.grad.abs() > 0


def test_mpconv_forced_weight_normalisation_only_in_training():
    torch.manual_seed(6)
    conv = MPConv(8, 4, [3, 3])
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.5, 2.0, 3.0, 10.0]).reshape(-1, 1, 1, 1))
    x = torch.randn(2, 8, 6, 6)
    before = conv.weight.detach().clone()
    y_eval = conv.eval()(x)
    assert torch.equal(conv.weight, before)  # eval mode leaves the stored weight alone
    y_train = conv.train()(x)
    rms = conv.weight.detach().double().pow(2).mean(dim=[1, 2, 3]).sqrt()
    # The stored weight is now normalize(before): RMS r/(eps+r) per output channel.
    r0 = before.double().pow(2).mean(dim=[1, 2, 3]).sqrt()
    torch.testing.assert_close(rms, r0 / (1e-4 + r0), rtol=1e-6, atol=0)
    # The effective weight normalize(normalize(w)) equals normalize(w) up to the eps (relative 2e-4).
    torch.testing.assert_close(y_train, y_eval, rtol=2e-4, atol=2e-4 * y_eval.abs().max().item())


def test_resample_box_filter():
    torch.manual_seed(7)
    x = torch.randn(2, 3, 8, 8)
    assert resample(x, mode='keep') is x
    down = resample(x, mode='down')
    torch.testing.assert_close(down, torch.nn.functional.avg_pool2d(x, 2))  # 2x2 of 0.25
    up = resample(x, mode='up')
    torch.testing.assert_close(up, x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))
    torch.testing.assert_close(resample(up, mode='down'), x)
    with pytest.raises(ValueError):
        resample(x, mode='sideways')


def test_mpconv_effective_weight_and_gain_precision():
    torch.manual_seed(8)
    conv = MPConv(6, 5, [3, 3])
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.1, 1.0, 4.0, 9.0, 50.0]).reshape(-1, 1, 1, 1))
    assert conv.fan_in == 54
    gain = torch.tensor(1.37)
    w = conv.effective_weight(gain).double()
    # Each output row has norm (r / (eps + r)) * gain, r the RMS of the stored row (norm / sqrt(fan_in)).
    r = conv.weight.detach().double().pow(2).mean(dim=[1, 2, 3]).sqrt()
    torch.testing.assert_close(w.pow(2).sum(dim=[1, 2, 3]).sqrt(), r / (1e-4 + r) * 1.37, rtol=1e-6, atol=0)
    # Rows point along the stored weight.
    cos = torch.nn.functional.cosine_similarity(w.flatten(1), conv.weight.detach().double().flatten(1))
    torch.testing.assert_close(cos, torch.ones(5, dtype=torch.float64))
    # gain_dtype rounds the tensor gain's scale gain / sqrt(fan_in) to that precision, nothing else.
    scale16 = (gain / math.sqrt(54)).half().float()
    assert scale16 != gain / math.sqrt(54)  # 1.37 / sqrt(54) is not a float16 number
    w32 = conv.effective_weight(gain)
    conv.gain_dtype = torch.float16
    try:
        w16 = conv.effective_weight(gain)
        torch.testing.assert_close(w16, normalize(conv.weight.detach()) * scale16, rtol=0, atol=0)
        assert not torch.equal(w16, w32)
        # A plain Python gain is never rounded.
        torch.testing.assert_close(conv.effective_weight(), normalize(conv.weight.detach()) * (1 / math.sqrt(54)),
                                   rtol=0, atol=0)
    finally:
        conv.gain_dtype = None
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(conv.eval()(x, gain=gain),
                               torch.nn.functional.conv2d(x, conv.effective_weight(gain), padding=1))
