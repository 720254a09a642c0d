"""Tests of the 2D toy example (edm2.toy, toy_example.py; autoguidance paper, Figure 1 and Appendix C),
including parity with fixtures made by the release's toy_example.py (fixtures/toy/README.json)."""

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from edm2 import toy
from edm2.phema import std_to_exp

from conftest import fixture_path

EPS32 = float(torch.finfo(torch.float32).eps)
PACKAGE_DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'edm2', 'toy', 'data')


def _package_data(name):
    """A file of the toy's package data (edm2/toy/data, where the library reads it); missing: the test fails."""
    path = os.path.join(PACKAGE_DATA, name)
    if not os.path.isfile(path):
        pytest.fail(f'package data missing: {path} (edm2/toy/data is part of the repository)')
    return path


def test_the_library_reads_the_package_data():
    assert os.path.samefile(toy.reference.data_dir(), PACKAGE_DATA)
    models = toy.release_models()
    assert set(models) == {'net', 'autoguide', 'cfg_guide'}
    assert toy.release_models('/nonexistent') is None


@pytest.fixture(scope='module')
def mix():
    return toy.gt('A')


# ---- the ground-truth mixture ----------------------------------------------------------------------------

def test_component_counts_and_weights():
    for classes, k in [('A', 1016), ('B', 1016), ('AB', 2032)]:
        m = toy.gt(classes)
        assert len(m) == k == len(m.means) == len(m.covs)
        assert m.num_branches == k // 8 and len(m.leaf_branches) == 64 * len(classes)
        assert abs(float(m.weights.sum()) - 1) < 1e-12
        assert torch.all(m.weights > 0)
        assert torch.all(torch.linalg.eigvalsh(m.covs) > 0)


def test_tree_matches_the_formulas_by_hand():
    """Branches rebuilt from the tree's formulas and RandomState(2)'s draw order: every branch draws its
    length's number, then the + child's angle's, then the - child's, also at depth 6 (children not built)."""
    draws = np.random.RandomState(2).randn(400)
    scale = np.array([1.3136, 1.3844])
    origin = np.array([0.0030, 0.0325])
    # Class A consumes 127 branches x 3 numbers; class B's first is number 381.
    for classes, r1, angle in [('A', draws[0], math.pi / 4), ('B', draws[381], 5 * math.pi / 4)]:
        m = toy.gt(classes)
        L = 0.292 * (1 + 0.2 * r1)
        u = np.array([math.cos(angle), math.sin(angle)])
        for j, t in enumerate(np.linspace(0.07, 0.93, 8)):
            np.testing.assert_allclose(m.means[j].numpy(), (origin + u * L * t) * scale, rtol=0, atol=1e-12)
        h = 0.2 / L
        s = scale * L * 0.06
        cov = (np.outer(u, u) + (np.eye(2) - np.outer(u, u)) * h ** 2) * np.outer(s, s)
        np.testing.assert_allclose(m.covs[0].numpy(), cov, rtol=1e-12, atol=0)
    a = toy.gt('A')
    L0 = 0.292 * (1 + 0.2 * draws[0])
    u0 = np.array([1, 1]) / math.sqrt(2)
    end0 = origin + u0 * L0
    # The + child of A's trunk: angle pi/4 + (1 + 0.2 r) with r = draw 1, its length from draw 2.
    L1 = 0.292 * 0.8 * (1 + 0.2 * draws[2])
    a1 = math.pi / 4 + (1 + 0.2 * draws[1])
    u1 = np.array([math.cos(a1), math.sin(a1)])
    np.testing.assert_allclose(a.means[8].numpy(), (end0 + u1 * L1 * 0.07) * scale, atol=1e-12)
    # The - child comes after the + child's subtree (63 branches, 189 numbers: draws 2..190), angle from
    # draw 191, length from draw 192; it is branch 64 in depth-first order.
    L2 = 0.292 * 0.8 * (1 + 0.2 * draws[192])
    a2 = math.pi / 4 - (1 + 0.2 * draws[191])
    u2 = np.array([math.cos(a2), math.sin(a2)])
    np.testing.assert_allclose(a.means[64 * 8].numpy(), (end0 + u2 * L2 * 0.07) * scale, atol=1e-12)
    # Relative weights: L * 0.5^d.
    np.testing.assert_allclose(float(a.weights[8] / a.weights[0]), L1 * 0.5 / L0, rtol=1e-12)


@pytest.fixture(scope='module')
def release_gt():
    return torch.load(fixture_path('toy', 'ground-truth.pt'), weights_only=True)


@pytest.mark.parametrize('classes', toy.CLASSES)
def test_ground_truth_matches_the_release(release_gt, classes):
    """Components (in the release's order) and the exact logp / score at 2000 points and five noise levels
    match the release's ground truth: logp within 1e-3 where it exceeds -30, score within 1e-3 relative."""
    ref = release_gt['classes'][classes]
    m = toy.gt(classes)
    assert ref['num_components'] == len(m)
    torch.testing.assert_close(m.weights.float(), ref['phi'], rtol=1e-5, atol=0)
    torch.testing.assert_close(m.means.float(), ref['mu'], rtol=0, atol=1e-6)
    torch.testing.assert_close(m.covs.float(), ref['Sigma'], rtol=1e-5, atol=1e-12)
    x, sigma = release_gt['x'], release_gt['sigma']
    for dtype in (torch.float64, torch.float32):
        logp, score = m.logp_and_score(x.to(dtype), sigma.to(dtype))
        ok = ref['logp'] > -30
        assert ok.sum() > 1000
        assert float((logp.float() - ref['logp'])[ok].abs().max()) <= 1e-3
        rel = (score.float() - ref['score']).norm(dim=1) / ref['score'].norm(dim=1)
        assert float(rel[ok].max()) <= 1e-3


def test_union_is_both_trees_jointly_normalised():
    a, b, ab = toy.gt('A'), toy.gt('B'), toy.gt('AB')
    torch.testing.assert_close(ab.means, torch.cat([a.means, b.means]), rtol=0, atol=0)
    wa = ab.weights[:1016].sum()
    torch.testing.assert_close(ab.weights[:1016] / wa, a.weights, rtol=1e-12, atol=0)
    assert 0.3 < float(wa) < 0.7


@pytest.mark.parametrize('sigma', [0.0, 0.003, 0.03, 0.3, 3.0])
def test_fast_path_matches_per_component_reference(mix, sigma):
    gen = torch.Generator().manual_seed(1)
    x = mix.sample(1000, sigma, gen, dtype=torch.float64)
    x = torch.cat([x, torch.randn(50, 2, generator=gen, dtype=torch.float64) * 2])  # include far-away points
    ref_logp, ref_score = mix.reference_logp_score(x, sigma)
    logp, score = mix.logp_and_score(x, sigma)
    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(score, ref_score, rtol=1e-9, atol=1e-9 * float(ref_score.abs().max()))


@pytest.mark.parametrize('sigma', [0.005, 0.05, 0.5, 5.0])
def test_score_matches_finite_differences(mix, sigma):
    """Central differences of log p (float64) with step h: truncation error O(h^2 |d3 logp|) << 1e-3."""
    gen = torch.Generator().manual_seed(2)
    x = mix.sample(200, sigma, gen, dtype=torch.float64)
    score = mix.score(x, sigma)
    h = 1e-4 * (sigma + 0.01)  # well below the smallest component width sqrt(var + sigma^2) >= ~0.01
    fd = torch.stack([(mix.logp(x + h * e, sigma) - mix.logp(x - h * e, sigma)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    err = (fd - score).norm(dim=1)
    assert torch.all(err <= 1e-3 * score.norm(dim=1) + 1e-6 / (sigma + 0.01)), float((err / score.norm(dim=1)).max())


def test_per_point_sigma_equals_scalar_sigma(mix):
    gen = torch.Generator().manual_seed(3)
    sig = torch.tensor([0.01, 0.1, 1.0], dtype=torch.float64).repeat_interleave(100)
    x = mix.sample(300, sig, gen, dtype=torch.float64)
    lp, sc = mix.logp_and_score(x, sig)
    for i, s in enumerate([0.01, 0.1, 1.0]):
        lp1, sc1 = mix.logp_and_score(x[i * 100:(i + 1) * 100], s)
        torch.testing.assert_close(lp[i * 100:(i + 1) * 100], lp1, rtol=1e-13, atol=1e-12)
        torch.testing.assert_close(sc[i * 100:(i + 1) * 100], sc1, rtol=1e-13, atol=1e-10)


@pytest.mark.parametrize('sigma', [0.0, 0.002, 0.05, 1.0])
def test_float32_score_accuracy(mix, sigma):
    """The float32 path used in training vs float64. Its error comes from rounding e = x - m_b (|x| <~ 2)
    and the precision P (entries up to 1/min variance), so |error| <~ c * eps32 * 2 * max|P|; we allow
    c = 16 on top of a relative error of 16 * eps32 * (number of branches)."""
    gen = torch.Generator().manual_seed(4)
    x = mix.sample(4096, sigma, gen, dtype=torch.float64)
    x32 = x.float()
    s64 = mix.score(x32.double(), sigma)
    s32 = mix.score(x32, sigma).double()
    min_var = float(torch.linalg.eigvalsh(mix.covs).min()) + sigma ** 2
    bound = 16 * EPS32 * (2 / min_var + s64.norm(dim=1) * mix.num_branches)
    assert torch.all((s32 - s64).norm(dim=1) <= bound)
    lp64, lp32 = mix.logp(x32.double(), sigma), mix.logp(x32, sigma).double()
    assert torch.all((lp32 - lp64).abs() <= 16 * EPS32 * (lp64.abs() + 2 * 2 / min_var))


def test_sample_moments_match_analytic(mix):
    n = 200_000
    gen = torch.Generator().manual_seed(5)
    sigma = 0.3
    x = mix.sample(n, sigma, gen, dtype=torch.float64)
    mean, cov = mix.mean(), mix.cov(sigma)
    se_mean = (cov.diagonal() / n).sqrt()
    assert torch.all((x.mean(0) - mean).abs() <= 5 * se_mean)
    d = x - x.mean(0)
    prods = d[:, :, None] * d[:, None, :]
    se_cov = prods.reshape(n, 4).std(0).reshape(2, 2) / math.sqrt(n)
    assert torch.all((prods.mean(0) - cov).abs() <= 5 * se_cov)


def test_sampling_is_reproducible(mix):
    a = mix.sample(100, 0.1, torch.Generator().manual_seed(7))
    b = mix.sample(100, 0.1, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_bad_input(mix):
    with pytest.raises(ValueError, match='unknown class'):
        toy.gt('C')
    with pytest.raises(ValueError, match=r'\[n, 2\]'):
        mix.score(torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match='non-negative'):
        mix.logp(torch.zeros(5, 2), -0.1)
    with pytest.raises(ValueError, match='positive'):
        toy.ToyModel(width=0)
    with pytest.raises(ValueError, match='unknown class'):
        toy.train('Z', iterations=1)
    with pytest.raises(ValueError, match='positive'):
        toy.train('A', iterations=0)


# ---- model, sampler, metrics -------------------------------------------------------------------------------

def test_smoothed_gt_is_the_mixture_at_a_larger_noise_level(mix):
    x = mix.sample(100, 0.1, torch.Generator().manual_seed(8))
    torch.testing.assert_close(toy.SmoothedGT('A', 0.03).score(x, 0.04), mix.score(x, 0.05), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(toy.SmoothedGT('A').score(x, 0.04), mix.score(x, 0.04), rtol=0, atol=0)
    models = toy.ideal_models()
    assert models['cfg_guide'].mixture is toy.gt('AB') and models['autoguide'].blur > models['net'].blur
    with pytest.raises(ValueError, match='blur'):
        toy.SmoothedGT('A', -0.1)


def test_untrained_model_is_the_prior_gaussian():
    torch.manual_seed(0)
    net = toy.ToyModel(16, 2)
    x = torch.randn(10, 2)
    for sigma in [0.01, 1.0]:
        torch.testing.assert_close(net.score(x, sigma), -x / (0.25 + sigma ** 2), rtol=1e-6, atol=1e-6)


def test_score_is_gradient_of_logp():
    torch.manual_seed(0)
    net = toy.ToyModel(16, 2).eval()  # eval: no in-place forced weight normalisation between the calls
    with torch.no_grad():
        net.gain.fill_(0.7)
    x = torch.randn(8, 2, dtype=torch.float64)
    net = net.double()
    h = 1e-6
    fd = torch.stack([(net.logp(x + h * e, 0.3) - net.logp(x - h * e, 0.3)) / (2 * h)
                      for e in torch.eye(2, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(net.score(x, 0.3), fd, rtol=1e-6, atol=1e-6)


def test_learning_rate_schedule():
    assert toy.learning_rate(0) == 0.01 and toy.learning_rate(512) == 0.01
    assert abs(toy.learning_rate(2048) - 0.005) < 1e-15


def test_training_reduces_loss_and_ema_is_average(tmp_path):
    net, snaps, losses = toy.train('A', width=16, layers=2, iterations=40, batch=256, seed=0, snapshots=(1, 40))
    # The trained EMA model beats the untrained one (the prior Gaussian) on a fixed held-out batch.
    mix = toy.gt('A')
    gen = torch.Generator().manual_seed(99)
    sigma = (torch.randn(4096, generator=gen) * 1.5 - 2.3).exp()
    x = mix.sample(4096, sigma, gen)
    target = mix.score(x, sigma)

    def loss(model):
        return float((sigma[:, None] ** 2 * (model.score(x, sigma) - target) ** 2).mean())

    assert loss(net) < 0.8 * loss(toy.ToyModel(16, 2).eval())
    # After the first step the EMA equals the weights (beta = 0 at t = 1); later it lags behind.
    assert not torch.equal(snaps[1].gain, snaps[40].gain)
    path = tmp_path / 'm.safetensors'
    toy.save_model(path, net, classes='A')
    net2, meta = toy.load_model(path)
    assert meta['classes'] == 'A'
    x = torch.randn(5, 2)
    torch.testing.assert_close(net2.score(x, 0.2), net.score(x, 0.2), rtol=0, atol=0)


def test_load_model_errors(tmp_path):
    with pytest.raises(toy.ToyModelError, match='not found'):
        toy.load_model(tmp_path / 'missing.safetensors')
    bad = tmp_path / 'bad.safetensors'
    bad.write_bytes(b'not a safetensors file')
    with pytest.raises(toy.ToyModelError, match='not a toy model'):
        toy.load_model(bad)


# ---- parity with the release's training and sampling ------------------------------------------------------

def ours(state_dict):
    """The release's state dict under our keys (its linear layers sit at layers.0, 2, 4, 6, 8)."""
    mapping = {f'layers.{2 * i}.weight': f'layers.{i}.weight' for i in range(5)}
    mapped = {mapping.get(k, k): v for k, v in state_dict.items()}
    assert set(mapped) == {'gain'} | set(mapping.values())
    return mapped


@pytest.mark.parametrize('case', ['from_scratch', 'later'])
def test_training_steps_match_the_release(case):
    """Three steps of our training procedure from the release's initial weights and batches reproduce its
    loss, gradients, weights and EMA weights after each step: from scratch (iterations 0-2) and at
    iteration 700, where the learning rate has decayed and the EMA's beta > 0. Tolerances: float32
    rounding of a width-64 MLP's second-order gradient (errors seen ~1e-6 relative)."""
    c = torch.load(fixture_path('toy', 'train-steps.pt'), weights_only=True)[case]
    assert toy.from_release_state_dict(c['init_net']).keys() == ours(c['init_net']).keys()
    net = toy.ToyModel(c['width'], c['layers']).train()
    net.load_state_dict(ours(c['init_net']))
    ema = toy.ToyModel(c['width'], c['layers']).eval().requires_grad_(False)
    ema.load_state_dict(ours(c['init_ema']))
    opt = toy.make_optimizer(net)
    gamma = std_to_exp(0.010)
    mixture = toy.gt('A')
    for step in c['steps']:
        it = step['iteration']
        lr, beta = toy.learning_rate(it), toy.ema_beta(it, gamma)
        assert lr == pytest.approx(step['lr'], rel=1e-12) and beta == pytest.approx(step['beta'], rel=1e-9, abs=1e-40)
        x, sigma = step['x'], step['sigma']
        torch.testing.assert_close(mixture.score(x, sigma), step['gt_score'], rtol=1e-4,
                                   atol=1e-5 * float(step['gt_score'].abs().max()))
        # A copy: a forward in training mode renormalises the stored weights, which must happen once per step.
        net_score = copy.deepcopy(net).score(x, sigma)
        torch.testing.assert_close(net_score, step['net_score'], rtol=1e-4,
                                   atol=1e-5 * float(step['net_score'].abs().max()))
        loss = toy.train_step(net, ema, opt, x, sigma, step['gt_score'], lr, beta)
        assert float(loss) == pytest.approx(step['loss'], rel=1e-5)
        grads = {k: v.grad for k, v in net.named_parameters()}
        for k, g in ours(step['grads']).items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()) + 1e-12, msg=k)
        for name, model in [('net_after', net), ('ema_after', ema)]:
            state = model.state_dict()
            for k, v in ours(step[name]).items():
                torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5, msg=f'{name} {k} at iteration {it}')


@pytest.fixture(scope='module')
def release():
    """The release procedure's trained models of seed 0 (main, autoguide, cfg_guide) as our ToyModels."""
    data = torch.load(_package_data('release-models-seed0.pt'), weights_only=True)
    data['nets'] = {k: toy.release_model(v['state_dict']) for k, v in data['models'].items()}
    return data


def test_release_models_give_the_release_logp_and_score(release):
    assert {k: n.init_kwargs['width'] for k, n in release['nets'].items()} == \
        {k: v['hidden_dim'] for k, v in release['models'].items()}
    x, sigma = release['x'], release['sigma']
    for name, net in release['nets'].items():
        ref = release['models'][name]
        torch.testing.assert_close(net.logp(x, sigma), ref['logp'], rtol=1e-5,
                                   atol=1e-6 * float(ref['logp'].abs().max()), msg=name)
        torch.testing.assert_close(net.score(x, sigma), ref['score'], rtol=1e-5,
                                   atol=1e-6 * float(ref['score'].abs().max()), msg=name)


def test_sampler_matches_the_release_sampler(release):
    """32 Heun steps from the release's initial points: unguided, autoguidance w=3, CFG w=4 (max difference
    <= 1e-4)."""
    nets, s = release['nets'], release['sampling']
    runs = {'unguided': toy.guided_score(nets['main']),
            'autoguidance_w3': toy.guided_score(nets['main'], nets['autoguide'], 3.0),
            'cfg_w4': toy.guided_score(nets['main'], nets['cfg_guide'], 4.0)}
    for name, score_fn in runs.items():
        x = toy.heun_sample(score_fn, s['x_init'], num_steps=32, sigma_min=0.002, sigma_max=5.0, rho=7.0)
        assert float((x - s[name]).abs().max()) <= 1e-4, name


@pytest.mark.slow
def test_heun_on_exact_score_reproduces_ground_truth(mix):
    """With the exact score the probability-flow ODE maps the diffused ground truth onto the ground truth:
    outlier rate ~1% and full coverage, like true samples (a check of the sampler and the metrics)."""
    gen = torch.Generator().manual_seed(6)
    n = 4000
    x0 = mix.sample(n, 5.0, gen)
    x = toy.heun_sample(toy.guided_score(toy.SmoothedGT('A')), x0, num_steps=32, sigma_max=5.0)
    level = toy.outlier_level(mix, num=100_000)
    r = toy.evaluate(x, mix, level)
    gt = toy.evaluate(mix.sample(n, 0.0, gen), mix, level)
    se = math.sqrt(0.01 * 0.99 / n)
    assert abs(gt['outlier_rate'] - 0.01) < 5 * se
    assert r['outlier_rate'] < 0.01 + 5 * se + 0.01  # + discretisation error of 32 Heun steps
    assert r['branch_tv'] < 0.1 and gt['branch_tv'] < 0.1
    # Naive truncation with the exact score concentrates mass on the heaviest branches.
    xt = toy.heun_sample(toy.guided_score(toy.SmoothedGT('A'), None, 3.0), x0, num_steps=32, sigma_max=5.0)
    assert toy.evaluate(xt, mix, level)['branch_tv'] > r['branch_tv'] + 0.1


# ---- guidance rules on the toy's denoisers ------------------------------------------------------------------

def test_guided_score_with_rules():
    """Rules act on D = x + sigma^2 score per 2D point: rescale with phi = 0 and apg with eta = 1 are lerp;
    apg with eta = 0 leaves an update orthogonal to D1; the rule's state starts afresh with every sampling."""
    net, guide = toy.SmoothedGT('A', 0.02), toy.SmoothedGT('A', 0.04)
    x = toy.gt('A').sample(64, 0.3, torch.Generator().manual_seed(0), dtype=torch.float64)
    for sigma in (0.05, 0.3, 2.0):
        lerp = toy.guided_score(net, guide, 3.0)(x, sigma)
        for spec in ('rescale:phi=0', 'apg:eta=1'):
            torch.testing.assert_close(toy.guided_score(net, guide, 3.0, spec)(x, sigma), lerp, rtol=1e-9, atol=1e-9)
        d1 = x + sigma ** 2 * net.score(x, sigma)
        d = x + sigma ** 2 * toy.guided_score(net, guide, 3.0, 'apg:eta=0')(x, sigma)
        cosine = ((d - d1) * d1).sum(1) / ((d - d1).norm(dim=1) * d1.norm(dim=1))
        assert cosine.abs().max() < 1e-9
        assert not torch.allclose(d, x + sigma ** 2 * lerp)
    score = toy.guided_score(net, guide, 3.0, 'apg:eta=0,momentum=-0.5')
    x0 = toy.gt('A').sample(32, 5.0, torch.Generator().manual_seed(1))
    first = toy.heun_sample(score, x0, num_steps=4)
    assert vars(score).keys() == {'net', 'guide', 'w', 'rule'}  # the run's state is not kept on the score
    torch.testing.assert_close(toy.heun_sample(score, x0, num_steps=4), first, rtol=0, atol=0)
    no_momentum = toy.heun_sample(toy.guided_score(net, guide, 3.0, 'apg:eta=0'), x0, num_steps=4)
    assert not torch.allclose(first, no_momentum)


# ---- command line ------------------------------------------------------------------------------------------

def cli():
    from edm2.commands import toy_example
    return toy_example.cli


@pytest.mark.parametrize('args, message', [
    (['train', '--classes', 'C', '--outdir', 'x'], 'unknown class'),
    (['train', '--width', '0', '--outdir', 'x'], '--width'),
    (['train', '--iterations', '-3', '--outdir', 'x'], '--iterations'),
    (['eval', '--out', 'e.json'], 'no trained model'),
    (['plot', '--models', 'nowhere'], 'not found'),
    (['eval', '--ideal', '--models', 'x'], '--ideal uses no trained models'),
    (['train', '--ema', '0.5', '--outdir', 'x'], '--ema'),
    (['demo', '--seeds', '0,1.5'], '--seeds'),
    (['demo', '--seeds', 'one'], '--seeds'),
    (['demo', '--device', 'nonsense'], '--device'),
    (['eval', '--ideal', '--guidance-rule', 'apg:eta=x'], '--guidance-rule'),
    (['rules', '--out', 'r.png', '--guidance-rule', 'rescale'], 'needs phi'),
    (['rules', '--out', 'r.png'], 'give at least one of --models DIR, --release, --ideal'),
])
def test_cli_bad_input_one_line(tmp_path, args, message):
    res = CliRunner().invoke(cli(), args)
    assert res.exit_code != 0
    assert message in res.output
    assert 'Traceback' not in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)


@pytest.mark.slow
def test_cli_train_eval_plot(tmp_path):
    """End to end on tiny settings: train three models, eval (table + JSON), plot (PNG)."""
    runner = CliRunner()
    d = str(tmp_path / 'm')
    for name, classes in [('main', 'A'), ('autoguide', 'A'), ('cfg-guide', 'AB')]:
        res = runner.invoke(cli(), ['train', '--classes', classes, '--width', '8', '--layers', '2', '--iterations', '3',
                                    '--batch', '64', '--outdir', d, '--name', name, '--device', 'cpu'])
        assert res.exit_code == 0, res.output
        assert os.path.isfile(os.path.join(d, f'{name}.safetensors'))
    res = runner.invoke(cli(), ['eval', '--models', d, '--num', '200', '--steps', '4', '--device', 'cpu'])
    assert res.exit_code == 0, res.output
    assert 'autoguidance' in res.output
    text = ' '.join(res.output.split())  # the legend below the table is wrapped
    assert 'leaf coverage: leaf branches' in text and 'branch TV: total variation' in text
    data = json.load(open(os.path.join(d, 'eval.json')))
    assert set(data['results']) == set(toy.METHODS)
    res = runner.invoke(cli(), ['plot', '--models', d, '--num', '200', '--steps', '4', '--device', 'cpu',
                                '--out', str(tmp_path / 'f.png')])
    assert res.exit_code == 0, res.output
    from PIL import Image
    assert Image.open(tmp_path / 'f.png').size[0] > 500
    assert not [f for f in os.listdir(tmp_path) if '.tmp' in f]


@pytest.mark.slow
def test_cli_demo_seeds(tmp_path):
    """demo --seeds on tiny settings: per-seed tables, mean and range per method for ours and the release
    procedure, the checks; a second run reuses the models and their evaluations."""
    args = ['demo', '--seeds', '0,1', '--outdir', str(tmp_path / 'd'), '--main-iterations', '2',
            '--guide-iterations', '2', '--batch', '64', '--num', '200', '--device', 'cpu']
    res = CliRunner().invoke(cli(), args)
    assert res.exit_code == 0, res.output
    for text in ['seed 0 (models in', 'seed 1 (models in', 'ours, published settings (mean [min, max] over seeds 0, 1)',
                 'release procedure (reference data) (mean [min, max] over seeds 0, 1, 2)', 'checks on ours:']:
        assert text in res.output
    assert os.path.isfile(tmp_path / 'd' / 'seed-1' / 'eval.json')
    res2 = CliRunner().invoke(cli(), args)
    assert res2.exit_code == 0, res2.output
    assert res2.output.count('reusing') == 8  # 2 seeds x (3 models + eval.json)

    def summary(out):
        return out.split('ours, published settings')[1].split('done (')[0]
    assert summary(res2.output) == summary(res.output)


def test_release_reference_data():
    """The copy in the code equals the fixture's README.json; on the release's own seeds the three checks hold."""
    from edm2.toy import reference
    table, source = toy.release_results(str(fixture_path('toy')))
    assert source.endswith('README.json') and table == reference.RELEASE_RESULTS
    assert toy.release_results('/nonexistent') == (reference.RELEASE_RESULTS, 'the copy in edm2/toy/reference.py')
    assert all(holds for _, holds in toy.seed_checks(table))
    # A seed where autoguidance has more outliers than unguided and CFG's TV is close to autoguidance's fails.
    bad = {**table, 3: dict(table[0], autoguidance=(40.0, 10.0, 0.6))}
    checks = toy.seed_checks(bad)
    assert not checks[0][1] and not checks[1][1] and checks[2][1]


@pytest.mark.slow
def test_cli_eval_ideal_needs_no_models(tmp_path):
    out = tmp_path / 'e.json'
    res = CliRunner().invoke(cli(), ['eval', '--ideal', '--num', '300', '--steps', '4', '--device', 'cpu',
                                     '--out', str(out)])
    assert res.exit_code == 0, res.output
    data = json.load(open(out))
    assert data['settings']['ideal'] is True and set(data['results']) == set(toy.METHODS)
    # Four Heun steps from sigma 5 with a blurred main model leave most samples off the thin tree.
    assert data['results']['unguided']['outlier_rate'] > data['results']['ground truth']['outlier_rate']


# ---- the paper's claim, on smaller settings --------------------------------------------------------------

SMALL = dict(main_iterations=1024, guide_iterations=256, batch=2048, num=4000)


@pytest.fixture(scope='module')
def small_run():
    """Main model (A, width 64) and both guides (width 32; autoguide A, CFG guide A+B) on reduced settings,
    sampled from the same initial points and evaluated against the exact ground truth (~60 s on 2 cores)."""
    main, _, _ = toy.train('A', 64, 4, iterations=SMALL['main_iterations'], batch=SMALL['batch'], seed=0)
    ag, _, _ = toy.train('A', 32, 4, iterations=SMALL['guide_iterations'], batch=SMALL['batch'], seed=1)
    cfg, _, _ = toy.train('AB', 32, 4, iterations=SMALL['guide_iterations'], batch=SMALL['batch'], seed=2)
    mixture = toy.gt('A')
    samples = toy.sample_methods(main, ag, cfg, num=SMALL['num'], seed=0)
    level = toy.outlier_level(mixture, num=100_000)
    return {name: toy.evaluate(x, mixture, level) for name, x in samples.items()}


@pytest.mark.slow
def test_guidance_effects_that_hold(small_run):
    r = small_run
    se = math.sqrt(0.01 * 0.99 / SMALL['num'])
    assert abs(r['ground truth']['outlier_rate'] - 0.01) < 5 * se
    # Naive truncation removes every outlier but also every leaf branch.
    assert r['naive truncation']['outlier_rate'] < 0.01
    assert r['naive truncation']['leaf_coverage'] < 0.1
    assert r['naive truncation']['branch_tv'] > 0.4
    # CFG's samples distribute over the branches far worse than autoguidance's.
    assert r['CFG']['branch_tv'] > r['autoguidance']['branch_tv'] + 0.2


@pytest.mark.slow
def test_what_the_release_models_show(release):
    """What the release procedure's own trained models (seed 0) show, sampled with our sampler from the
    same initial points and evaluated against the exact ground truth (4000 samples, deterministic):
    autoguidance removes part of the outliers (at most 3/4 of unguided's rate); CFG's branch distribution
    is far off the ground truth's (TV >= 0.5 and >= 2 x autoguidance's); naive truncation loses the leaves."""
    nets = release['nets']
    mixture = toy.gt('A')
    samples = toy.sample_methods(nets['main'], nets['autoguide'], nets['cfg_guide'], num=4000, seed=0)
    r = {name: toy.evaluate(x, mixture, toy.outlier_level(mixture, num=100_000)) for name, x in samples.items()}
    assert r['autoguidance']['outlier_rate'] <= 0.75 * r['unguided']['outlier_rate']
    assert r['CFG']['branch_tv'] >= 0.5
    assert r['CFG']['branch_tv'] >= 2 * r['autoguidance']['branch_tv']
    assert r['naive truncation']['leaf_coverage'] < 0.1


def assert_paper_claim(r, n):
    """The paper's claim: autoguidance removes most outliers (at most half of unguided's rate) while its branch
    distribution stays within 0.05 TV of the ground truth's and its leaf coverage within 0.3 (at 8000 samples a
    leaf expects ~8 of them, so the ground truth's own leaf coverage varies from 0.91 to 0.97); CFG removes
    outliers too (at most half of unguided's, up to 3 standard errors) but distributes the samples far
    worse over the branches; naive truncation loses the leaves."""
    unguided, ag, cfg, trunc = r['unguided'], r['autoguidance'], r['CFG'], r['naive truncation']
    half = 0.5 * unguided['outlier_rate']
    se = math.sqrt(half * (1 - half) / n)
    assert ag['outlier_rate'] <= half
    assert ag['branch_tv'] <= r['ground truth']['branch_tv'] + 0.05
    assert ag['leaf_coverage'] >= r['ground truth']['leaf_coverage'] - 0.3
    assert cfg['outlier_rate'] <= half + 3 * se
    assert cfg['branch_tv'] >= ag['branch_tv'] + 0.3
    assert trunc['leaf_coverage'] < 0.1 and trunc['branch_tv'] > 0.4


@pytest.mark.slow
def test_autoguidance_claim_with_idealised_models():
    """The paper's mechanism with models whose only error is lost resolution (SmoothedGT: main blurred by
    0.02, guides by 0.04) on the published weights and sampler (~40 s on 2 cores)."""
    n = 8000
    m = toy.ideal_models()
    mixture = toy.gt('A')
    samples = toy.sample_methods(m['net'], m['autoguide'], m['cfg_guide'], num=n, seed=1)
    level = toy.outlier_level(mixture, num=100_000)
    r = {name: toy.evaluate(x, mixture, level) for name, x in samples.items()}
    assert r['unguided']['outlier_rate'] > 0.1   # the blurred main model does scatter samples off the tree
    assert_paper_claim(r, n)


@pytest.mark.slow
def test_cli_rules_tiny_is_seeded_and_lerp_is_eval(tmp_path):
    """`rules` on tiny settings: one panel per rule, numbers in JSON beside the PNG, the same on a rerun, and its
    lerp panel the autoguidance of `eval` (same models, seed and weight)."""
    runner = CliRunner()
    args = ['rules', '--ideal', '--num', '300', '--steps', '4', '--device', 'cpu', '--dpi', '40']
    res = runner.invoke(cli(), args + ['--out', str(tmp_path / 'r.png')])
    assert res.exit_code == 0, res.output
    data = json.load(open(tmp_path / 'r.json'))
    (label, results), = data['results'].items()
    assert list(results) == ['lerp', 'apg:eta=0,momentum=0,threshold=0', 'rescale:phi=0.7']
    assert len({r['outlier_rate'] for r in results.values()}) == 3  # the rules do differ
    res = runner.invoke(cli(), args + ['--out', str(tmp_path / 'again.png')])
    assert res.exit_code == 0, res.output
    assert json.load(open(tmp_path / 'again.json'))['results'] == data['results']
    res = runner.invoke(cli(), ['eval', '--ideal', '--num', '300', '--steps', '4', '--device', 'cpu',
                                '--out', str(tmp_path / 'e.json')])
    assert res.exit_code == 0, res.output
    assert json.load(open(tmp_path / 'e.json'))['results']['autoguidance'] == results['lerp']
    from PIL import Image
    assert Image.open(tmp_path / 'r.png').size[0] > 300


# ---- the release's command lines and pickles ---------------------------------------------------------------

def _release_pickle(path, state_dict):
    """A pickle in the release's persistent-class format holding a toy model with `state_dict`'s weights (its
    linear layers at the even indices of `layers`, activations between them, and `gain`), written as the
    published EDM2 pickles are (tests/test_checkpoint.py's stand-in release modules)."""
    import pickle

    from helpers import _module_state, _Persistent, _release_modules
    weights = [state_dict[f'layers.{i}.weight'] for i in range(0, 2 * 5, 2) if f'layers.{i}.weight' in state_dict]
    modules = []
    for k, w in enumerate(weights):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data.copy_(w)
        modules += [linear] + ([torch.nn.SiLU()] if k < len(weights) - 1 else [])

    class ToyModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(*modules)
            self.gain = torch.nn.Parameter(state_dict['gain'].clone())
    with _release_modules() as (reconstruct, EasyDict):
        net = _Persistent(reconstruct, 'ToyModel', _module_state(ToyModel(), reconstruct, '# source\n'), '# source\n')
        with open(path, 'wb') as f:
            pickle.dump(EasyDict(net=net), f, protocol=4)


def test_release_format_pickle_is_read_as_data(release, tmp_path):
    """A release-format pickle loads as the same model (float16 storage, as the published pickles), without
    running anything from it; a pickle without a toy model is one line naming the file."""
    sd = release['models']['autoguide']['state_dict']
    _release_pickle(tmp_path / 'ag.pkl', sd)
    net, meta = toy.load_model(tmp_path / 'ag.pkl')
    assert meta == {'format': 'release-pickle'}
    expected = toy.release_model({k: v.half().float() for k, v in sd.items()})
    x, sigma = torch.randn(64, 2), torch.full((64,), 0.3)
    assert torch.equal(net.logp(x, sigma), expected.logp(x, sigma))
    import pickle
    (tmp_path / 'other.pkl').write_bytes(pickle.dumps({'a': torch.zeros(2).numpy().tolist()}))
    with pytest.raises(toy.ToyModelError, match='other.pkl: no toy model'):
        toy.load_model(tmp_path / 'other.pkl')
    (tmp_path / 'code.pkl').write_bytes(pickle.dumps({'f': os.system}))
    with pytest.raises(toy.ToyModelError, match='code.pkl: cannot read the pickle'):
        toy.load_model(tmp_path / 'code.pkl')


@pytest.mark.slow
def test_release_command_lines(release, tmp_path):
    """`train --outdir --cls --layers --dim --viz` and `plot --net --gnet --guidance --save` (the release's flags)
    run: the flags mean ours (--cls = --classes, --dim = --width, --guidance = the autoguidance weight), and
    plot reads a release-format pickle as --gnet."""
    runner = CliRunner()
    d = tmp_path / 'run'
    args = ['--outdir', str(d), '--layers', '2', '--iterations', '3', '--batch', '64', '--device', 'cpu']
    res = runner.invoke(cli(), ['train', '--cls', 'AB', '--dim', '8', '--viz', *args])
    assert res.exit_code == 0, res.output
    trained, meta = toy.load_model(d / 'toy-AB-2x8-3.safetensors')
    assert meta['classes'] == 'AB' and trained.init_kwargs['width'] == 8
    assert (d / 'toy-AB-2x8-3.png').is_file()
    res = runner.invoke(cli(), ['train', '--classes', 'AB', '--width', '8', *args, '--name', 'ours'])
    assert res.exit_code == 0, res.output
    assert toy.load_model(d / 'ours.safetensors')[0].state_dict().keys() == trained.state_dict().keys()
    for k, v in toy.load_model(d / 'ours.safetensors')[0].state_dict().items():
        assert torch.equal(v, trained.state_dict()[k]), k  # the same run under the release's flag names
    _release_pickle(tmp_path / 'guide.pkl', release['models']['autoguide']['state_dict'])
    res = runner.invoke(cli(), ['plot', '--net', str(d / 'toy-AB-2x8-3.safetensors'), '--gnet', str(tmp_path / 'guide.pkl'),
                                '--guidance', '3', '--save', str(tmp_path / 'fig.png'), '--num', '200', '--steps', '4',
                                '--device', 'cpu', '--dpi', '30'])
    assert res.exit_code == 0, res.output
    from PIL import Image
    width, height = Image.open(tmp_path / 'fig.png').size
    assert width > 1.5 * height  # one row of three panels: ground truth, unguided, autoguided
    res = runner.invoke(cli(), ['plot', '--net', str(tmp_path / 'nope.pkl'), '--save', str(tmp_path / 'x.png')])
    assert res.exit_code == 1 and 'Error: --net: ' in res.output and 'nope.pkl' in res.output


def test_eval_does_not_replace_the_demos_eval_json(tmp_path):
    (tmp_path / 'eval.json').write_text('{"demo": true}')
    for name in ('main', 'autoguide', 'cfg-guide'):
        toy.save_model(tmp_path / f'{name}.safetensors', toy.ToyModel(8, 1))
    res = CliRunner().invoke(cli(), ['eval', '--models', str(tmp_path), '--num', '10', '--steps', '1'])
    assert res.exit_code == 2 and 'eval.json exists' in res.output and '--out FILE' in res.output
    assert (tmp_path / 'eval.json').read_text() == '{"demo": true}'
