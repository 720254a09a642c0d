"""edm2.sampling: schedule, Heun sampler, guidance (weights, per-step interval, several guides).

Most tests use analytic denoisers: for data y ~ N(mu, s^2 I) the ideal denoiser is
D(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu), and the probability-flow ODE has the closed-form
solution x(sigma) - mu = (x(sigma_max) - mu) sqrt(s^2 + sigma^2) / sqrt(s^2 + sigma_max^2).
"""

import math

import pytest
import torch
from helpers import Gaussian

from edm2.sampling import (GuidedDenoiser, Guidance, HeunOptions, SamplingError, SigmaInterval, StepInterval,
                           edm_schedule, heun_sampler)


pytestmark = pytest.mark.usefixtures('one_thread')


def noise(n=4, seed=0, dtype=torch.float32, shape=(3, 4, 4)):
    return torch.randn([n, *shape], generator=torch.Generator().manual_seed(seed), dtype=dtype)


def sample(net, x, labels=None, num_steps=6, guides=(), weight=1.0, shares=None, interval=None,
           dtype=torch.float32, generators=None, **churn):
    """The library's composition: schedule, guided denoiser, per-step decisions, sampler."""
    guidance = Guidance(tuple(guides), weight, shares, interval)
    sigmas = edm_schedule(num_steps, dtype=dtype)
    return heun_sampler(guidance.denoiser(net, dtype), x, sigmas, labels, HeunOptions(dtype=dtype, **churn),
                        guided_steps=guidance.steps(sigmas), generators=generators)


# ----------------------------------------------------------------------------------------------------
# Schedule and sampler.

def test_schedule_endpoints_and_formula():
    t = edm_schedule(5, sigma_min=0.002, sigma_max=80, rho=7, dtype=torch.float64)
    assert t.shape == (6,) and t.dtype == torch.float64
    assert t[0].item() == pytest.approx(80, rel=1e-12) and t[4].item() == pytest.approx(0.002, rel=1e-12)
    assert t[5].item() == 0
    mid = (80 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    assert t[2].item() == pytest.approx(mid, rel=1e-12)
    assert bool((t[:-1][1:] < t[:-1][:-1]).all())
    assert edm_schedule(5).dtype == torch.float32  # the sampler's default arithmetic


@pytest.mark.parametrize('kwargs, message', [
    (dict(sigma_max=math.inf), 'sigma_max must be a positive finite'),
    (dict(sigma_max=math.nan), 'sigma_max must be a positive finite'),
    (dict(sigma_min=0.0), 'sigma_min must be a positive finite'),
    (dict(rho=1e-300), 'not finite, positive and strictly decreasing'),
    (dict(sigma_max=1e39), 'not finite'),  # overflows float32
    (dict(sigma_min=5.0, sigma_max=1.0), 'exceeds sigma_max'),
    (dict(sigma_min=1.0, sigma_max=1.0), 'strictly decreasing'),
    (dict(num_steps=0), 'positive integer'),
    (dict(num_steps=-3), 'positive integer'),
])
def test_schedule_refuses_degenerate_settings(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        edm_schedule(**dict(dict(num_steps=8), **kwargs))


@pytest.mark.parametrize('kwargs', [dict(S_churn=-1), dict(S_churn=math.inf), dict(S_noise=math.nan),
                                    dict(S_min=-0.1), dict(S_max=math.nan)])
def test_options_refuse_bad_values(kwargs):
    with pytest.raises(SamplingError):
        HeunOptions(**kwargs)


def test_heun_converges_to_exact_ode_solution_at_second_order():
    mu, s = 0.3, 0.5
    n = noise(dtype=torch.float64)
    exact = mu + (n * 80 - mu) * s / math.sqrt(s * s + 80 ** 2)
    errors = [(sample(Gaussian(mu, s), n, num_steps=N, dtype=torch.float64) - exact).abs().max().item()
              for N in (16, 32, 64)]
    # Heun is second order: doubling the steps divides the error by about 4 (3.5 leaves room for the
    # first-order final Euler step, whose error here is ~1e-5 relative).
    assert errors[0] / errors[1] > 3.5 and errors[1] / errors[2] > 3.5
    assert errors[2] < 1e-2


def test_main_net_evaluated_2n_minus_1_times_at_the_schedule():
    D = Gaussian()
    heun_sampler(D, noise(), edm_schedule(6))
    assert D.calls == 2 * 6 - 1
    t = edm_schedule(6).tolist()
    expected = []
    for i in range(6):
        expected.append(t[i])
        if i < 5:
            expected.append(t[i + 1])
    assert D.sigmas == expected


def test_churn_only_inside_s_range_and_per_image_generators():
    # With churn the result depends on the generators; an image must not depend on its batch mates.
    D = Gaussian()
    n = noise(3)
    kwargs = dict(num_steps=6, S_churn=5, S_min=0.05, S_max=10)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    batch = sample(D, n, generators=gens([10, 11, 12]), **kwargs)
    alone = sample(D, n[1:2], generators=gens([11]), **kwargs)
    assert torch.equal(batch[1:2], alone)
    # Churn noise is drawn exactly at the steps with S_min <= sigma_i <= S_max, one [C,H,W] draw each.
    t = edm_schedule(6).tolist()[:6]
    churned = sum(0.05 <= s <= 10 for s in t)
    g = gens([11])
    sample(D, n[1:2], generators=g, **kwargs)
    ref = torch.Generator().manual_seed(11)
    for _ in range(churned):
        torch.randn([3, 4, 4], generator=ref)
    assert torch.equal(torch.randn(5, generator=g[0]), torch.randn(5, generator=ref))
    # The raised noise levels sigma_i (1 + gamma), gamma = min(S_churn / N, sqrt(2) - 1), reach the net.
    D = Gaussian()
    sample(D, n, num_steps=6, S_churn=5, S_min=0.05, S_max=10)
    gamma = min(5 / 6, math.sqrt(2) - 1)
    hats = D.sigmas[0::2]
    for s, h in zip(t, hats):
        assert h == pytest.approx(s * (1 + gamma) if 0.05 <= s <= 10 else s, rel=1e-6)


def test_bad_schedule_given_to_the_sampler():
    with pytest.raises(SamplingError, match='the last one 0'):
        heun_sampler(Gaussian(), noise(), torch.tensor([80.0, 1.0]))
    with pytest.raises(SamplingError, match='3 guidance decisions given for 6 steps'):
        heun_sampler(Gaussian(), noise(), edm_schedule(6), guided_steps=[True] * 3)


# ----------------------------------------------------------------------------------------------------
# Guidance.

def test_guided_denoiser_formula():
    D1, D0 = Gaussian(0.3, 0.5), Gaussian(-0.2, 0.7)
    x = noise(dtype=torch.float64)
    sigma = torch.tensor(1.3, dtype=torch.float64)
    out = GuidedDenoiser(D1, [D0], weight=2.5, dtype=torch.float64)(x, sigma)
    expected = D0(x, sigma) + 2.5 * (D1(x, sigma) - D0(x, sigma))
    assert (out - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()
    # guided=False: the main network alone, the guide not evaluated.
    D0.calls = 0
    alone = GuidedDenoiser(D1, [D0], weight=2.5, dtype=torch.float64)(x, sigma, guided=False)
    assert torch.equal(alone, D1(x, sigma)) and D0.calls == 0


def test_guidance_one_never_evaluates_the_guide():
    D1, D0 = Gaussian(), Gaussian(-0.2)
    out = sample(D1, noise(), guides=[D0], weight=1.0, num_steps=5)
    assert D0.calls == 0 and D1.calls == 9
    assert torch.equal(out, sample(Gaussian(), noise(), num_steps=5))


@pytest.mark.parametrize('churn', [{}, dict(S_churn=4, S_min=0.05, S_max=20)])
def test_interval_guides_whole_steps_and_counts_evaluations(churn):
    # Guided steps: main and guide twice (the correction too), once on the last step; unguided steps:
    # the guide is never evaluated, not even for a correction at a level inside the interval.
    N = 8
    t = edm_schedule(N).tolist()
    lo, hi = (t[6] + t[5]) / 2, (t[2] + t[1]) / 2  # ends between schedule points: steps 2..5 guided
    gens = [torch.Generator().manual_seed(k) for k in range(4)]
    D1, D0 = Gaussian(), Gaussian(-0.2)
    denoiser = GuidedDenoiser(D1, [D0], weight=2.0)
    sigmas = edm_schedule(N)
    steps = SigmaInterval(lo, hi).select(sigmas)
    assert steps == [False, False, True, True, True, True, False, False]
    heun_sampler(denoiser, noise(), sigmas, guided_steps=steps, generators=gens, options=HeunOptions(**churn))
    assert D1.calls == 2 * N - 1 and D0.calls == 2 * 4 and denoiser.num_evals == [2 * N - 1, 8]
    # The guide saw exactly the evaluations of steps 2..5: sigma_hat_i and sigma_{i+1}.
    main_by_step = [D1.sigmas[2 * i: 2 * i + 2] for i in range(N)]
    assert D0.sigmas == [s for i in range(2, 6) for s in main_by_step[i]]
    # With the last step guided: once there.
    D1, D0 = Gaussian(), Gaussian(-0.2)
    heun_sampler(GuidedDenoiser(D1, [D0], weight=2.0), noise(), sigmas, guided_steps=StepInterval(6, 7).select(sigmas))
    assert D0.calls == 2 + 1 and D0.sigmas == D1.sigmas[12:15]


def test_interval_edges_are_half_open():
    sigmas = edm_schedule(8)
    t = sigmas.tolist()
    steps = SigmaInterval(t[5], t[2]).select(sigmas)  # (sigma_5, sigma_2]: sigma_2 is inside, sigma_5 is not
    assert steps == [False, False, True, True, True, False, False, False]


def test_sigma_and_step_intervals_select_the_same_steps_at_32_steps():
    # The guidance-interval paper's EDM2-XXL setting: sigma in (0.19, 1.61] = steps 17..22 at 32 steps;
    # and EDM2-S's (0.28, 2.9] = steps 16..22.
    sigmas = edm_schedule(32)
    assert SigmaInterval(0.19, 1.61).select(sigmas) == StepInterval(17, 22).select(sigmas)
    assert SigmaInterval(0.28, 2.9).select(sigmas) == StepInterval(16, 22).select(sigmas)
    assert SigmaInterval(0.19, 1.61).select(edm_schedule(32, dtype=torch.float64)) == StepInterval(17, 22).select(sigmas)


def test_interval_covering_everything_equals_plain_guidance_and_empty_equals_none():
    n = noise()
    plain = sample(Gaussian(), n, guides=[Gaussian(-0.2)], weight=2.0, num_steps=6)
    full = sample(Gaussian(), n, guides=[Gaussian(-0.2)], weight=2.0, interval=SigmaInterval(0, math.inf), num_steps=6)
    assert torch.equal(plain, full)
    every = sample(Gaussian(), n, guides=[Gaussian(-0.2)], weight=2.0, interval=StepInterval(0, 5), num_steps=6)
    assert torch.equal(plain, every)
    G = Gaussian(-0.2)
    empty = sample(Gaussian(), n, guides=[G], weight=2.0, interval=SigmaInterval(1.0, 1.0), num_steps=6)
    assert G.calls == 0
    assert torch.equal(empty, sample(Gaussian(), n, num_steps=6))
    assert not torch.equal(plain, empty)  # guidance does change the result here


def test_several_guides():
    n = noise()
    A, B = Gaussian(-0.2, 0.7), Gaussian(0.6, 0.4)
    one = sample(Gaussian(), n, guides=[Gaussian(-0.2, 0.7)], weight=2.0, num_steps=6)
    # Weights (1, 0): exactly the first guide alone; the zero-weight guide is not evaluated.
    both = sample(Gaussian(), n, guides=[A, B], shares=[1, 0], weight=2.0, num_steps=6)
    assert torch.equal(both, one) and B.calls == 0 and A.calls == 11
    # Two identical guides equal one (0.5 a + 0.5 a = a exactly; other splits within float32 rounding).
    twice = sample(Gaussian(), n, guides=[Gaussian(-0.2, 0.7)] * 2, weight=2.0, num_steps=6)
    assert torch.equal(twice, one)
    split = sample(Gaussian(), n, guides=[Gaussian(-0.2, 0.7)] * 2, shares=[0.3, 0.7], weight=2.0, num_steps=6)
    assert (split - one).abs().max().item() <= 1e-5 * one.abs().max().item()


def test_several_guides_formula():
    # D = D1 + sum_k w_k (D1 - D0k), w_k = (w - 1) a_k, in float64.
    D1, A, B = Gaussian(0.3, 0.5), Gaussian(-0.2, 0.7), Gaussian(0.6, 0.4)
    x, sigma = noise(dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    out = GuidedDenoiser(D1, [A, B], weight=2.2, shares=[0.25, 0.75], dtype=torch.float64)(x, sigma)
    d1 = D1(x, sigma)
    expected = d1 + 1.2 * (0.25 * (d1 - A(x, sigma)) + 0.75 * (d1 - B(x, sigma)))
    assert (out - expected).abs().max().item() <= 1e-12 * expected.abs().max().item()


def test_conditional_and_unconditional_guides_get_the_right_labels():
    main, cond, uncond = Gaussian(label_dim=5), Gaussian(-0.2, label_dim=5), Gaussian(0.1, label_dim=0)
    labels = torch.eye(5)[[1, 3, 4, 0]]
    sample(main, noise(), labels, guides=[cond, uncond], weight=2.0, num_steps=3)
    assert all(lab is labels for lab in main.labels + cond.labels)
    assert all(lab is None for lab in uncond.labels) and uncond.calls == 5


@pytest.mark.parametrize('guide, message', [
    (Gaussian(img_channels=4), 'img_channels=4'),
    (Gaussian(img_resolution=8), 'img_resolution=8'),
    (Gaussian(label_dim=7), 'label_dim=7'),
])
def test_mismatched_guides_are_refused(guide, message):
    with pytest.raises(SamplingError, match=message):
        sample(Gaussian(label_dim=5), noise(), torch.eye(5)[:4], guides=[guide], weight=2.0, num_steps=2)


@pytest.mark.parametrize('kwargs, message', [
    (dict(weight=2.0), 'needs at least one guiding network'),
    (dict(guides=[Gaussian()] * 2, weight=2.0, shares=[0.5]), '1 guide weights given for 2'),
    (dict(guides=[Gaussian()] * 2, weight=2.0, shares=[1.5, -0.5]), 'non-negative'),
    (dict(guides=[Gaussian()] * 2, weight=2.0, shares=[0.5, 0.6]), 'sum to 1'),
    (dict(guides=[Gaussian()], weight=math.nan), 'must be finite'),
    (dict(guides=[Gaussian()], weight=2.0, interval=StepInterval(1, 6)), r'outside the schedule of 2 steps \(0..1\)'),
])
def test_bad_guidance_settings(kwargs, message):
    with pytest.raises(SamplingError, match=message):
        sample(Gaussian(), noise(), num_steps=2, **kwargs)


@pytest.mark.parametrize('make, message', [
    (lambda: SigmaInterval(2.0, 1.0), 'LO <= HI'),
    (lambda: SigmaInterval(-1.0, 1.0), 'LO <= HI'),
    (lambda: SigmaInterval(math.nan, 1.0), 'LO <= HI'),
    (lambda: StepInterval(5, 3), 'FIRST <= LAST'),
    (lambda: StepInterval(-1, 3), 'FIRST <= LAST'),
])
def test_bad_intervals(make, message):
    with pytest.raises(SamplingError, match=message):
        make()


# ----------------------------------------------------------------------------------------------------
# The per-step interval rule against an independent reference on the published-format fixtures.

def reference_images(net, gnet, seeds, num_steps, weight, guided, churn=None):
    """An independent, deliberately plain implementation of the rule the guidance-interval paper's code
    follows: one image at a time, float32, per-seed generator (noise, class, churn noise), and each Heun
    step either fully guided (both evaluations) or fully unguided. `guided(i, sigma_i)` decides."""
    out = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn([1, net.img_channels, net.img_resolution, net.img_resolution], generator=g)
        c = torch.randint(net.label_dim, size=[], generator=g)
        onehot = torch.zeros([1, net.label_dim])
        onehot[0, c] = 1
        ramp = torch.arange(num_steps, dtype=torch.float32) / (num_steps - 1)
        s = (80 ** (1 / 7) + ramp * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        s = torch.cat([s, torch.zeros(1)])
        x = x * s[0]
        for i in range(num_steps):
            use = guided(i, float(s[i]))

            def D(y, level):
                d1 = net(y, level, onehot).to(torch.float32)
                if not use:
                    return d1
                d0 = gnet(y, level, onehot).to(torch.float32)
                return d0 + weight * (d1 - d0)

            level = s[i]
            if churn and churn['S_min'] <= float(s[i]) <= churn['S_max']:
                gamma = min(churn['S_churn'] / num_steps, math.sqrt(2) - 1)
                level = s[i] * (1 + gamma)
                x = x + torch.sqrt(level ** 2 - s[i] ** 2) * torch.randn(x.shape[1:], generator=g)[None]
            k1 = (x - D(x, level)) / level
            y = x + (s[i + 1] - level) * k1
            if i < num_steps - 1:
                k2 = (y - D(y, s[i + 1])) / s[i + 1]
                y = x + (s[i + 1] - level) * (k1 + k2) / 2
            x = y
        out.append((x[0] * 127.5 + 128).clip(0, 255).to(torch.uint8))
    return torch.stack(out)


@pytest.mark.slow
@pytest.mark.parametrize('churn', [None, dict(S_churn=10, S_min=0.05, S_max=50)])
def test_interval_matches_independent_per_step_reference(official, churn):
    import edm2
    from edm2.generation import generate
    net, encoder, _ = edm2.load_snapshot(official('main-rgb16.pkl'))
    gnet, _, _ = edm2.load_snapshot(official('guide-rgb16.pkl'))
    N, seeds = 8, [0, 1, 2, 5]
    t = edm_schedule(N).tolist()
    lo, hi = (t[5] + t[6]) / 2, (t[1] + t[2]) / 2  # both ends strictly between schedule points
    want = reference_images(net, gnet, seeds, N, 2.0, lambda i, s: lo < s <= hi, churn)
    guidance = Guidance((gnet,), 2.0, interval=SigmaInterval(lo, hi))
    options = HeunOptions(**(churn or {}))
    got = torch.cat([b.images for b in generate(net, seeds, guidance=guidance, sigmas=edm_schedule(N),
                                                 options=options, encoder=encoder, batch_size=3)])
    diff = (got.int() - want.int()).abs()
    identical = (diff == 0).float().mean().item()
    assert diff.max().item() <= 1 and identical >= 0.999, (diff.max().item(), identical)
    # The rule matters here: guiding per evaluation instead (the correction of step 0 at sigma_1 is
    # inside the interval, and so on) gives clearly different images.
    per_step = guidance.steps(edm_schedule(N))
    assert per_step == [False, False, True, True, True, True, False, False]
    unguided_ref = reference_images(net, gnet, seeds, N, 2.0, lambda i, s: False, churn)
    assert (got.int() - unguided_ref.int()).abs().max().item() > 1
