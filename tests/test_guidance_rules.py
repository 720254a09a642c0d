"""Guidance rules (edm2.guidance_rules): lerp, APG and rescale against independent per-image versions written
here from the papers' equations, APG's momentum through the sampler, parity on the fixture networks, and the
--guidance-rule flag of both generating commands."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import calculate_metrics
from edm2.commands import generate_images
import edm2
from edm2 import generation, sampling
from edm2.denoiser import StatefulDenoiser
from edm2.guidance_rules import APG, Lerp, Rescale, RuleError, parse_rule

pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------------------------------
# Independent versions: one image at a time, numpy float64.

def ref_lerp(d1, d0, w):
    return d0 + w * (d1 - d0)


def ref_apg(d1, d0, w, eta=0.0, beta=0.0, r=0.0, buffer=None):
    """Sadat et al. (ICLR 2025): momentum, norm cap, projection onto D1. `buffer` (a list, one array per
    image, updated in place) is the running m."""
    out = []
    for i in range(len(d1)):
        delta = d1[i] - d0[i]
        if beta != 0:
            delta = delta + beta * buffer[i]
            buffer[i] = delta
        if r > 0:
            norm = np.sqrt(np.sum(delta * delta))
            delta = delta * min(1.0, r / norm)
        parallel = np.sum(delta * d1[i]) / np.sum(d1[i] * d1[i]) * d1[i]
        out.append(d1[i] + (w - 1) * ((delta - parallel) + eta * parallel))
    return np.stack(out)


def ref_rescale(d1, d0, w, phi):
    """Lin et al. (WACV 2024), sec. 3.4: the lerp brought to std(D1), blended with phi."""
    out = []
    for i in range(len(d1)):
        guided = ref_lerp(d1[i], d0[i], w)
        rescaled = guided * np.std(d1[i]) / np.std(guided)
        out.append(phi * rescaled + (1 - phi) * guided)
    return np.stack(out)


def _pair(seed, dtype, n=5):
    """D1, D0 for n images of very different scales (a batch-wide norm or std would be caught)."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64).reshape(-1, 1, 1, 1)
    d1 = torch.randn([n, 3, 8, 8], generator=g, dtype=torch.float64) * scale + 0.3
    d0 = d1 * 0.8 + torch.randn([n, 3, 8, 8], generator=g, dtype=torch.float64) * scale * 0.5
    return d1.to(dtype), d0.to(dtype)


def _assert_rel(got, expected, tol=1e-6):
    """Per image: max |got − expected| <= tol · max |expected|."""
    got = got.double().numpy()
    for i in range(len(expected)):
        err = np.abs(got[i] - expected[i]).max() / np.abs(expected[i]).max()
        assert err <= tol, f'image {i}: relative error {err:.2e}'


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('w', [0.5, 2.5])
def test_lerp_and_rescale_equal_the_equations(dtype, w):
    d1, d0 = _pair(0, dtype)
    a, b = d1.double().numpy(), d0.double().numpy()
    out, state = Lerp().combine(d1, d0, w)
    assert out.dtype == dtype and state is None
    _assert_rel(out, ref_lerp(a, b, w))
    for phi in (0.0, 0.7, 1.0):
        out, state = Rescale(phi).combine(d1, d0, w)
        assert out.dtype == dtype and state is None
        _assert_rel(out, ref_rescale(a, b, w, phi))
    # phi = 1 gives every image exactly the std of its D1.
    stds = Rescale(1.0).combine(d1, d0, w)[0].double().std(dim=[1, 2, 3])
    torch.testing.assert_close(stds, d1.double().std(dim=[1, 2, 3]), rtol=1e-5, atol=0)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
@pytest.mark.parametrize('eta, r', [(0.0, 0.0), (0.3, 0.0), (0.0, 4.0), (1.0, 4.0)])
def test_apg_without_momentum_equals_the_equations(dtype, eta, r):
    d1, d0 = _pair(1, dtype)
    out, state = APG(eta=eta, threshold=r).combine(d1, d0, 3.0)
    assert out.dtype == dtype and state is None
    _assert_rel(out, ref_apg(d1.double().numpy(), d0.double().numpy(), 3.0, eta=eta, r=r))
    if r:  # the cap is active for some images only (scales 0.1 .. 10)
        norms = (d1 - d0).double().square().sum([1, 2, 3]).sqrt()
        assert (norms > r).any() and (norms < r).any()


def test_apg_eta_one_is_lerp_and_eta_zero_removes_the_parallel_part():
    d1, d0 = _pair(2, torch.float64)
    torch.testing.assert_close(APG(eta=1).combine(d1, d0, 2.5)[0], Lerp().combine(d1, d0, 2.5)[0], rtol=1e-12,
                               atol=1e-12)
    update = APG(eta=0).combine(d1, d0, 2.5)[0] - d1
    cosine = (update * d1).sum([1, 2, 3]) / (update.square().sum([1, 2, 3]) * d1.square().sum([1, 2, 3])).sqrt()
    assert cosine.abs().max() < 1e-12


class _Net:
    """A deterministic stand-in denoiser: D(x; σ) = tanh(a x) σ / (1 + σ) + b x, with label_dim 0."""

    img_channels, img_resolution, label_dim = 3, 8, 0

    def __init__(self, a, b):
        self.a, self.b = a, b

    def __call__(self, x, sigma, labels=None):
        return torch.tanh(self.a * x) * (sigma / (1 + sigma)) + self.b * x

    def numpy(self, x, sigma):
        return np.tanh(self.a * x) * (sigma / (1 + sigma)) + self.b * x


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_apg_momentum_over_seven_guided_and_unguided_evaluations(dtype):
    main, guide = _Net(1.3, 0.2), _Net(0.7, 0.1)
    rule = parse_rule('apg:eta=0.25,momentum=-0.5,threshold=6')
    denoiser = sampling.GuidedDenoiser(main, [guide], weight=2.5, dtype=dtype, rule=rule)
    guided = [True, False, True, True, False, False, True]
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn([4, 3, 8, 8], generator=g, dtype=torch.float64) * (1 + k) for k in range(7)]
    sigmas = [5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1]

    def reference():
        buffer = [np.zeros([3, 8, 8]) for _ in range(4)]
        out = []
        for x, sigma, is_guided in zip(xs, sigmas, guided):
            x = x.to(dtype).double().numpy()
            d1, d0 = main.numpy(x, sigma), guide.numpy(x, sigma)
            out.append(ref_apg(d1, d0, 2.5, eta=0.25, beta=-0.5, r=6.0, buffer=buffer) if is_guided else d1)
        return out

    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for batch in range(2):  # the second run starts from no state (a zero buffer) again
        state = None
        for k, (expected, is_guided) in enumerate(zip(reference(), guided)):
            got, state = denoiser.evaluate(xs[k].to(dtype), torch.tensor(sigmas[k], dtype=dtype), None, is_guided,
                                           state)
            _assert_rel(got, expected, tol=tol)
    assert denoiser.num_evals == [14, 8]
    # The state carried over from the run gives another result: the state is what carries the momentum.
    carried, _ = denoiser.evaluate(xs[0].to(dtype), torch.tensor(sigmas[0], dtype=dtype), None, True, state)
    with pytest.raises(AssertionError):
        _assert_rel(carried, reference()[0], tol=tol)
    _assert_rel(denoiser(xs[0].to(dtype), torch.tensor(sigmas[0], dtype=dtype)), reference()[0], tol=tol)


def _reference_heun(main, guide, noise, sigmas, guided_steps, apg_args):
    """The deterministic Heun sampler (EDM paper, Algorithm 1) with APG, written out in float64."""
    buffer = [np.zeros(noise.shape[1:]) for _ in range(len(noise))]

    def denoise(x, sigma, step):
        d1 = main.numpy(x, sigma)
        if not guided_steps[step]:
            return d1
        return ref_apg(d1, guide.numpy(x, sigma), 2.0, buffer=buffer, **apg_args)

    x = noise.numpy() * sigmas[0]
    n = len(sigmas) - 1
    for i in range(n):
        d = (x - denoise(x, sigmas[i], i)) / sigmas[i]
        x_next = x + (sigmas[i + 1] - sigmas[i]) * d
        if i < n - 1:
            d_end = (x_next - denoise(x_next, sigmas[i + 1], i)) / sigmas[i + 1]
            x_next = x + (sigmas[i + 1] - sigmas[i]) * (d + d_end) / 2
        x = x_next
    return x


def test_heun_sampler_with_momentum_equals_a_reference_sampler_and_resets_per_batch():
    main, guide = _Net(1.3, 0.2), _Net(0.7, 0.1)
    sigmas = sampling.edm_schedule(6, dtype=torch.float64)
    guidance = sampling.Guidance(guides=(guide,), weight=2.0, interval=sampling.StepInterval(1, 4),
                                 rule='apg:eta=0.5,momentum=-0.75,threshold=3')
    denoiser = guidance.denoiser(main, torch.float64)
    noise = torch.randn([3, 3, 8, 8], generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    options = sampling.HeunOptions(dtype=torch.float64)
    steps = guidance.steps(sigmas)
    first = sampling.heun_sampler(denoiser, noise, sigmas, None, options, guided_steps=steps)
    second = sampling.heun_sampler(denoiser, noise, sigmas, None, options, guided_steps=steps)
    assert torch.equal(first, second)  # the buffer is zero at the start of every batch
    expected = _reference_heun(main, guide, noise, sigmas.tolist(), steps, dict(eta=0.5, beta=-0.75, r=3.0))
    _assert_rel(first, expected, tol=1e-10)
    no_momentum = _reference_heun(main, guide, noise, sigmas.tolist(), steps, dict(eta=0.5, r=3.0))
    assert np.abs(no_momentum - expected).max() > 1e-3  # the momentum matters here


def _foreign_sampler(denoiser, noise, sigmas):
    """An Euler sampler that is not ours: it calls the denoiser as a plain D(x, sigma, labels)."""
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (sigma_next - sigma) * (x - denoiser(x, sigma, None)) / sigma
    return x


def test_a_rule_state_cannot_leak_into_another_batch_or_run():
    """APG with momentum: 4 images then 1 image through one guided denoiser give for the 1 image what a fresh
    denoiser gives (never a 4-image broadcast), through our sampler, through a sampler that is not ours and
    through the rule called directly; a state of another batch shape is refused in one line."""
    main, guide = _Net(1.3, 0.2), _Net(0.7, 0.1)
    spec = 'apg:eta=0.25,momentum=-0.5,threshold=6'
    sigmas = sampling.edm_schedule(6, dtype=torch.float64)
    options = sampling.HeunOptions(dtype=torch.float64)
    four, one = (torch.randn([n, 3, 8, 8], generator=torch.Generator().manual_seed(n), dtype=torch.float64)
                 for n in (4, 1))

    def denoiser():
        return sampling.GuidedDenoiser(main, [guide], weight=2.0, dtype=torch.float64, rule=spec)

    shared = denoiser()
    for run in (lambda d, x: sampling.heun_sampler(d, x, sigmas, None, options),
                lambda d, x: _foreign_sampler(d, x, sigmas)):
        run(shared, four)
        after_four, fresh = run(shared, one), run(denoiser(), one)
        assert after_four.shape == (1, 3, 8, 8) and torch.equal(after_four, fresh)
    # The foreign sampler's every call is a run of its own: no momentum, i.e. the rule without it.
    no_momentum = sampling.GuidedDenoiser(main, [guide], weight=2.0, dtype=torch.float64,
                                          rule='apg:eta=0.25,threshold=6')
    assert torch.equal(_foreign_sampler(shared, one, sigmas), _foreign_sampler(no_momentum, one, sigmas))
    assert not torch.equal(sampling.heun_sampler(shared, one, sigmas, None, options),
                           sampling.heun_sampler(no_momentum, one, sigmas, None, options))  # ours carries it

    rule = parse_rule(spec)
    d1, d0 = _pair(5, torch.float64, n=4)
    _, state = rule.combine(d1, d0, 2.0)
    assert state.shape == d1.shape
    alone, _ = rule.combine(d1[:1], d0[:1], 2.0)  # no state given: a fresh one
    assert torch.equal(alone, rule.combine(d1[:1], d0[:1], 2.0, None)[0]) and alone.shape == (1, 3, 8, 8)
    with pytest.raises(RuleError) as info:
        rule.combine(d1[:1], d0[:1], 2.0, state)
    assert str(info.value) == (f'{spec}: the momentum state is of a batch of shape [4, 3, 8, 8], this evaluation '
                               f'of [1, 3, 8, 8]; start every run with state=None')
    with pytest.raises(RuleError, match='momentum state is of a batch of shape'):
        shared.evaluate(one, sigmas[0], None, True, state)


def test_samplers_keep_no_state_on_the_denoiser():
    """The guided denoiser and the rule hold no run: after a run their attributes are what they were."""
    main, guide = _Net(1.3, 0.2), _Net(0.7, 0.1)
    denoiser = sampling.GuidedDenoiser(main, [guide], weight=2.0, rule='apg:momentum=-0.5')
    before = {k: v for k, v in vars(denoiser).items() if k != 'num_evals'}
    sampling.heun_sampler(denoiser, torch.randn([2, 3, 8, 8]), sampling.edm_schedule(4))
    assert {k: v for k, v in vars(denoiser).items() if k != 'num_evals'} == before
    assert not hasattr(denoiser, 'reset') and isinstance(denoiser, StatefulDenoiser)
    with pytest.raises(sampling.SamplingError, match='guidance decisions given for a _Net, which has no evaluate'):
        sampling.heun_sampler(main, torch.randn([2, 3, 8, 8]), sampling.edm_schedule(4), guided_steps=[True] * 4)


# ----------------------------------------------------------------------------------------------------
# Specs.

def test_specs_round_trip():
    assert parse_rule('lerp') == Lerp() and str(Lerp()) == 'lerp'
    assert parse_rule('apg') == APG() and parse_rule('apg:momentum=-0.5') == APG(momentum=-0.5)
    rule = parse_rule(' apg: threshold=15 , eta=0.123456789 ')
    assert rule == APG(eta=0.123456789, threshold=15.0)
    assert str(rule) == 'apg:eta=0.123456789,momentum=0,threshold=15' and parse_rule(str(rule)) == rule
    assert str(parse_rule('rescale:phi=0.7')) == 'rescale:phi=0.7'
    assert parse_rule(Rescale(0.5)) == Rescale(0.5)


@pytest.mark.parametrize('specs', [
    ['apg:momentum=-0', 'apg:momentum=0', 'apg:momentum=0.0', 'apg:momentum=-0.0', 'apg:momentum=+0e3', 'apg'],
    ['apg:eta=1.0', 'apg:eta=1', 'apg:eta=1e0', 'apg:eta=+1.000', 'apg:eta=1,momentum=-0,threshold=0.0'],
    ['apg:threshold=15', 'apg:threshold=15.0', 'apg:threshold=1.5e1'],
    ['apg:eta=0.1', 'apg:eta=0.10000000000000001', 'apg:eta=1e-1'],
    ['rescale:phi=-0', 'rescale:phi=0', 'rescale:phi=0.000'],
    ['rescale:phi=1.0', 'rescale:phi=1'],
])
def test_equal_rules_have_one_canonical_spec(specs):
    """Canonical specs normalise values (-0 is 0, 1.0 is 1, one float one text), so a resumed sweep, which
    keys its cells by the spec string, keys equal rules equally."""
    rules = [parse_rule(spec) for spec in specs]
    texts = {str(rule) for rule in rules}
    assert len(texts) == 1 and len(set(rules)) == 1, texts
    text = texts.pop()
    assert '-0' not in text and '.0,' not in text and not text.endswith('.0')
    assert str(parse_rule(text)) == text and parse_rule(text) == rules[0]


def test_constructed_rules_are_normalised_like_parsed_ones():
    assert str(APG(momentum=-0.0)) == str(APG()) == 'apg:eta=0,momentum=0,threshold=0'
    assert str(APG(eta=np.float64(0.5), threshold=15)) == str(parse_rule('apg:eta=0.5,threshold=15'))
    assert type(APG(threshold=15).threshold) is float and type(Rescale(np.float32(0.5)).phi) is float
    assert str(Rescale(-0.0)) == 'rescale:phi=0'
    for value in np.random.default_rng(0).normal(size=200) * 10.0 ** np.random.default_rng(1).integers(-8, 8, 200):
        rule = APG(eta=float(value), momentum=-float(value))
        assert parse_rule(str(rule)) == rule and str(parse_rule(str(rule))) == str(rule)


@pytest.mark.parametrize('spec, message', [
    ('apg:eta=x', "eta='x' is not a number"),
    ('apg:foo=1', "unknown key 'foo'"),
    ('rescale', 'rescale needs phi=NUMBER'),
    ('rescale:phi=1.5', 'phi must lie in [0, 1]'),
    ('apg:threshold=-1', 'threshold must be >= 0'),
    ('apg:eta=nan', 'eta must be finite'),
    ('apg:momentum=inf', 'momentum must be finite'),
    ('rescale:phi=-inf', 'phi must be finite'),
    ('apg:eta', "'eta' needs a value"),
    ('apg:eta=1,eta=2', 'given twice'),
    ('lerp:phi=1', "unknown key 'phi'"),
    ('cfg++', 'unknown guidance rule'),
])
def test_bad_specs(spec, message):
    with pytest.raises(RuleError) as info:
        parse_rule(spec)
    assert message in str(info.value) and '\n' not in str(info.value)
    assert repr(spec.split(':')[0]) in str(info.value) or spec in str(info.value)


# ----------------------------------------------------------------------------------------------------
# On the fixture networks.

@pytest.fixture(scope='module')
def fixture_nets():
    from conftest import fixture_path
    net, encoder, _ = edm2.load_snapshot(fixture_path('official', 'main-rgb16.pkl'))
    gnet, _, _ = edm2.load_snapshot(fixture_path('official', 'guide-rgb16.pkl'))
    return net.eval().requires_grad_(False), gnet.eval().requires_grad_(False), encoder


def _images(net, guidance, encoder, seeds=range(8), steps=8):
    batches = generation.generate(net, seeds, guidance=guidance, sigmas=sampling.edm_schedule(steps),
                                  encoder=encoder, batch_size=3)
    return torch.cat([b.images for b in batches])


class _LerpAsBefore:
    """The guided denoiser as it combined before rules existed: mixed.lerp(main, w), written here (a plain
    denoiser: every step guided)."""

    def __init__(self, net, guides, weight):
        self.net, self.guides, self.weight = net, guides, weight

    def __call__(self, x, sigma, labels=None):
        main = self.net(x, sigma, labels).to(torch.float32)
        return self.guides[0](x, sigma, labels).to(torch.float32).lerp(main, self.weight)


def test_lerp_is_bit_identical_to_the_sampler_before_rules(fixture_nets):
    net, gnet, _ = fixture_nets
    sigmas = sampling.edm_schedule(8)
    noise = torch.randn([4, 3, 16, 16], generator=torch.Generator().manual_seed(0))
    labels = torch.nn.functional.one_hot(torch.arange(4), 10).float()
    before = sampling.heun_sampler(_LerpAsBefore(net, [gnet], 2.0), noise, sigmas, labels)
    for rule in (Lerp(), 'lerp'):
        now = sampling.heun_sampler(sampling.GuidedDenoiser(net, [gnet], 2.0, rule=rule), noise, sigmas, labels)
        assert torch.equal(now, before)


@pytest.mark.slow
@pytest.mark.parametrize('guide', ['gnet', 'self:pag'])
def test_apg_eta_one_matches_lerp_on_fixture_networks(fixture_nets, guide):
    from edm2.self_guides import parse_self_guide
    net, gnet, encoder = fixture_nets
    g = gnet if guide == 'gnet' else parse_self_guide(guide).bind(net)
    lerp = _images(net, sampling.Guidance(guides=(g,), weight=2.0), encoder)
    apg = _images(net, sampling.Guidance(guides=(g,), weight=2.0, rule='apg:eta=1'), encoder)
    diff = (lerp.int() - apg.int()).abs()
    within = (diff <= 1).float().mean().item()
    assert within >= 0.999, f'{within:.4%} of pixels within 1 level; max difference {diff.max().item()}'
    other = _images(net, sampling.Guidance(guides=(g,), weight=2.0, rule='apg:eta=0'), encoder)
    assert (other.int() - lerp.int()).abs().max() > 1  # eta = 0 gives other images: the comparison can fail


# ----------------------------------------------------------------------------------------------------
# The --guidance-rule flag.

@pytest.fixture(scope='module')
def ref_npz(tmp_path_factory):
    """FID statistics of 128-d features, and tiny Inception weights that give such features."""
    from edm2.metrics import detectors
    folder = tmp_path_factory.mktemp('ref')
    np.savez(folder / 'ref.npz', mu=np.zeros(128), sigma=np.eye(128))
    torch.save(detectors.random_state_dict('inception', width_divisor=16), folder / 'inception-tiny.pth')
    return folder / 'ref.npz'


def _generate(*args):
    return CliRunner().invoke(generate_images.main, [str(a) for a in args])


def _gen(*args, ref):
    weights = ['--inception-weights', ref.parent / 'inception-tiny.pth', '--workers', 0]
    return CliRunner().invoke(calculate_metrics.cli, ['gen', '--ref', ref] + [str(a) for a in list(args) + weights])


def _one_line_usage_error(result, *fragments):
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1 and 'Traceback' not in result.output, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.mark.parametrize('spec', ['apg:eta=x', 'apg:foo=1', 'rescale', 'apg:threshold=-1', 'apg:eta=nan',
                                  'rescale:phi=inf', 'nope'])
def test_bad_rule_flags_in_both_commands(official, tmp_path, ref_npz, spec):
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    out = tmp_path / 'out'
    _one_line_usage_error(_generate('--net', net, '--gnet', gnet, '--guidance', 2, '--guidance-rule', spec,
                                    '--outdir', out, '--steps', 2, '--seeds', '0-1'), "'--guidance-rule'", spec)
    assert not out.exists()
    _one_line_usage_error(_gen('--net', net, '--gnet', gnet, '--guidance', 2, '--guidance-rule', spec,
                               '--metrics', 'fid', '--num', 2, '--steps', 2, '--out', tmp_path / 'r.json',
                               ref=ref_npz), "'--guidance-rule'", spec)
    assert not (tmp_path / 'r.json').exists()


def test_rule_flag_and_preset_rule_reach_the_images_and_the_record(official, tmp_path, ref_npz, monkeypatch):
    from edm2 import presets
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    common = ['--net', net, '--gnet', gnet, '--guidance', 3, '--steps', 4, '--seeds', '0-2', '--batch', 3]
    spec = 'rescale:phi=0.7'
    assert _generate(*common, '--guidance-rule', spec, '--outdir', tmp_path / 'a').exit_code == 0
    library = _images(edm2.load_snapshot(net)[0].eval(),
                      sampling.Guidance(guides=(edm2.load_snapshot(gnet)[0].eval(),), weight=3.0, rule=spec),
                      edm2.load_snapshot(net)[1], seeds=range(3), steps=4)
    from PIL import Image
    written = torch.stack([torch.from_numpy(np.array(Image.open(tmp_path / 'a' / f'{s:06d}.png'))).permute(2, 0, 1)
                           for s in range(3)])
    assert torch.equal(written, library)
    configs = tmp_path / 'configs'
    configs.mkdir()
    (configs / 'generate.toml').write_text(
        f"[tiny]\nnet = '{net}'\ngnet = '{gnet}'\nguidance = 3.0\nguidance_rule = '{spec}'\n"
        f"[bad]\nnet = '{net}'\nguidance_rule = 'apg:x=1'\n")
    monkeypatch.setenv('EDM2_CONFIG_DIR', str(configs))
    presets.load.cache_clear()
    try:
        result = _gen('--preset', 'tiny', '--metrics', 'fid', '--num', 3, '--steps', 4, '--batch', 3,
                      '--out', tmp_path / 'p.json', ref=ref_npz)
        assert result.exit_code == 0, result.output
        _one_line_usage_error(_gen('--preset', 'bad', '--metrics', 'fid', '--num', 3, ref=ref_npz),
                              "'--preset'", 'apg:x=1')
        result = _gen('--preset', 'tiny', '--guidance-rule', 'lerp', '--metrics', 'fid', '--num', 3, '--steps', 4,
                      '--batch', 3, '--out', tmp_path / 'l.json', ref=ref_npz)
        assert result.exit_code == 0, result.output
    finally:
        presets.load.cache_clear()
    record, lerp = (json.loads((tmp_path / name).read_text()) for name in ('p.json', 'l.json'))
    assert record['guidance_rule'] == spec and lerp['guidance_rule'] == 'lerp'
    assert record['runs'][0]['fid'] != lerp['runs'][0]['fid']
