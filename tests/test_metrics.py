"""edm2.metrics: detector parity with the official detectors, statistics, Fréchet distance,
precision/recall, reference files and weight-file lookup."""

import importlib.util
import pickle
import sys
import types
import warnings

import numpy as np
import pytest
import torch

from edm2.metrics import detectors as det_lib
from edm2.metrics import evaluate
from edm2.metrics.dinov2 import DINOv2ViT, preprocess
from edm2.metrics.frechet import FrechetError, frechet_distance
from edm2.metrics.inception import resize_bilinear_tf1
from edm2.metrics.precision_recall import knn_radii, precision_recall
from edm2.metrics.reference import ReferenceFileError, load_reference, save_reference
from edm2.metrics.stats import FeatureStats


pytestmark = pytest.mark.usefixtures('one_thread')

# ----------------------------------------------------------------------------------------------------
# Detector parity (stand-in weights built by the fixtures' rule, loaded through the user-facing loader)


def _weights_rule(detectors):
    path = detectors('weights_rule.py')
    spec = importlib.util.spec_from_file_location('weights_rule', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_inception_parity(detectors, tmp_path):
    fixture = torch.load(detectors('inception-fid.pt'), weights_only=False)
    rule = _weights_rule(detectors)
    weights = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
    torch.save(rule.inception_state_dict(fixture['shapes']), weights)
    det = det_lib.load_detector('inception', weights=weights)
    assert det.feature_dim == 2048
    for size, images in fixture['inputs'].items():
        expected = fixture['outputs'][size]
        with torch.no_grad():
            features, logits = det.net.features_and_logits(images)
        if size == '16x16':
            assert torch.equal(det(images), features)  # the detector's features are the pool features
        # float32 through ~100 layers of (conv, BN) with O(1) activations: agreement to ~1e-6 expected,
        # 1e-4 is the acceptance bound.
        assert (features - expected['pool_2048']).abs().max().item() < 1e-4, size
        assert (logits - expected['logits_unbiased']).abs().max().item() < 1e-4, size


def test_dinov2_parity(detectors, tmp_path):
    fixture = torch.load(detectors('dinov2-small.pt'), weights_only=False)
    rule = _weights_rule(detectors)
    weights = tmp_path / 'dinov2_vitl14_pretrain.pth'
    torch.save(rule.dinov2_state_dict(fixture['shapes']), weights)
    config = fixture['config']
    det = det_lib.load_detector('dinov2', weights=weights, num_heads=config['num_heads'])
    net = det.net
    assert (net.embed_dim, net.depth, net.patch_size) == (config['embed_dim'], config['depth'], config['patch_size'])
    assert net.grid_size * net.patch_size == config['img_size']
    with torch.no_grad():
        for res in ('518', '224'):  # native 37x37 grid, and the interpolated 16x16 grid
            err = (net(fixture[f'tensor_{res}']) - fixture[f'features_{res}']).abs().max().item()
            assert err < 1e-4, res
        for size, images in fixture['inputs_uint8'].items():
            err = (det(images) - fixture['features_uint8'][size]).abs().max().item()
            assert err < 1e-4, size


def test_dinov2_pil_resize_close_to_torch():
    # The exact (PIL) and fast (torch) resizes differ only by rounding to uint8 and filter details.
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    a, b = preprocess(images, 'torch'), preprocess(images, 'pil')
    assert a.shape == b.shape == (2, 3, 224, 224)
    # 1/255 of rounding in [0,1] units, divided by the smallest std 0.224, plus bicubic overshoot clipped by PIL.
    assert (a - b).abs().mean().item() < 2 / 255 / 0.224
    same = torch.randint(0, 256, (1, 3, 224, 224), dtype=torch.uint8)
    assert torch.allclose(preprocess(same, 'torch'), preprocess(same, 'pil'), atol=1e-6)


def test_tf1_resize_definition():
    # TF1 resize: destination i reads source i * in / out, no half-pixel offset, clamped at the end.
    x = torch.arange(4, dtype=torch.float32).reshape(1, 1, 1, 4).expand(1, 1, 4, 4)
    y = resize_bilinear_tf1(x, 8)
    assert torch.allclose(y[0, 0, 0], torch.tensor([0, 0.5, 1, 1.5, 2, 2.5, 3, 3]))
    x = torch.arange(8, dtype=torch.float32).reshape(1, 1, 1, 8).expand(1, 1, 8, 8)
    assert torch.allclose(resize_bilinear_tf1(x, 4)[0, 0, 0], torch.tensor([0., 2, 4, 6]))


def test_dinov2_position_embedding_native_and_offset():
    net = DINOv2ViT(embed_dim=8, depth=1, grid_size=4)
    with torch.no_grad():
        net.pos_embed.normal_()
    assert torch.equal(net.position_embedding(4, 4), net.pos_embed)
    pos = net.position_embedding(2, 2)
    assert pos.shape == (1, 5, 8)
    assert torch.equal(pos[:, 0], net.pos_embed[:, 0])  # the class token's embedding is not resampled
    # The +0.1 offset: the scale factor is (2 + 0.1) / 4, not 2 / 4, so the sampling positions differ
    # from a plain resize to 2x2.
    grid = net.pos_embed[:, 1:].reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    plain = torch.nn.functional.interpolate(grid, size=(2, 2), mode='bicubic').permute(0, 2, 3, 1).reshape(1, 4, 8)
    assert not torch.allclose(pos[:, 1:], plain)


# ----------------------------------------------------------------------------------------------------
# Weight files


def _tiny_inception_file(path):
    torch.save(det_lib.random_state_dict('inception', width_divisor=16), path)
    return path


def test_weights_lookup_order(tmp_path, monkeypatch):
    cached = det_lib.cache_dir() / det_lib.SPECS['inception']['file_name']
    cached.parent.mkdir(parents=True)
    _tiny_inception_file(cached)
    monkeypatch.delenv('EDM2_INCEPTION_WEIGHTS', raising=False)
    assert det_lib.find_weights('inception') == cached
    env_file = _tiny_inception_file(tmp_path / 'env.pth')
    monkeypatch.setenv('EDM2_INCEPTION_WEIGHTS', str(env_file))
    assert det_lib.find_weights('inception') == env_file
    explicit = _tiny_inception_file(tmp_path / 'explicit.pth')
    assert det_lib.find_weights('inception', explicit) == explicit
    det = det_lib.load_detector('inception', explicit)
    assert det.feature_dim == 128 and len(det.weights_sha256) == 64


def test_weights_missing_offline(monkeypatch, tmp_path):
    monkeypatch.delenv('EDM2_DINOV2_WEIGHTS', raising=False)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch-home'))
    url = 'http://127.0.0.1:9/dinov2_vitl14_pretrain.pth'  # nothing listens on port 9: as good as offline
    monkeypatch.setitem(det_lib.SPECS, 'dinov2', dict(det_lib.SPECS['dinov2'], url=url))
    with pytest.raises(det_lib.DetectorError) as e:
        det_lib.load_detector('dinov2')
    msg = str(e.value)
    assert '\n' not in msg and url in msg
    assert str(det_lib.cache_dir() / 'dinov2_vitl14_pretrain.pth') in msg and 'EDM2_DINOV2_WEIGHTS' in msg
    with pytest.raises(det_lib.DetectorError, match='given by --dinov2-weights'):
        det_lib.find_weights('dinov2', tmp_path / 'nope.pth')


def test_weights_bad_files(tmp_path):
    junk = tmp_path / 'junk.pth'
    junk.write_bytes(b'not a torch file')
    with pytest.raises(det_lib.DetectorError, match='cannot read'):
        det_lib.load_detector('inception', junk)
    wrong = tmp_path / 'wrong.pth'
    torch.save({'a': torch.zeros(1)}, wrong)
    with pytest.raises(det_lib.DetectorError, match='does not hold'):
        det_lib.load_detector('dinov2', wrong)
    nv = tmp_path / 'inception-2015-12-05.pkl'
    nv.write_bytes(b'x')
    with pytest.raises(det_lib.DetectorError, match='embed code'):
        det_lib.load_detector('inception', nv)


# ----------------------------------------------------------------------------------------------------
# Statistics and Fréchet distance


def test_feature_stats_match_numpy():
    rng = np.random.RandomState(0)
    f = (rng.randn(103, 16) * rng.rand(16) * 5 + rng.randn(16) * 10).astype(np.float32)
    stats = FeatureStats(16, num_items=103, keep_features=True)
    for start in range(0, 103, 10):  # uneven batches, given out of order
        stats.update(torch.from_numpy(f[start:start + 10]), torch.arange(start, min(start + 10, 103)))
    mu, sigma = stats.reduce().mu_sigma()
    f64 = f.astype(np.float64)
    # float64 accumulation of float32 inputs: errors ~1e-16 relative to sum |f|^2.
    assert np.allclose(mu, f64.mean(0), rtol=0, atol=1e-12 * np.abs(f64).max())
    assert np.allclose(sigma, np.cov(f64, rowvar=False), rtol=0, atol=1e-10 * (f64 ** 2).max())
    assert np.array_equal(stats.get_features(), f)


def _random_cov(rng, d):
    a = rng.randn(d, d)
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_identical_is_zero():
    rng = np.random.RandomState(1)
    mu, sigma = rng.randn(64), _random_cov(rng, 64)
    fd = frechet_distance(mu, sigma, mu, sigma)
    assert abs(fd) <= 1e-6 * np.trace(sigma)


def test_frechet_closed_form():
    # Covariances sharing eigenvectors Q: tr((S1 S2)^1/2) = sum sqrt(a_i b_i), so
    # FD = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.RandomState(2)
    d = 32
    q, _ = np.linalg.qr(rng.randn(d, d))
    a, b = rng.rand(d) * 3 + 0.1, rng.rand(d) * 2 + 0.05
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.randn(d), rng.randn(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # General (non-commuting) case: the definition with the symmetric form S1^1/2 S2 S1^1/2.
    s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(w)) @ v.T
    tr = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_checks():
    eye = np.eye(2)
    with pytest.raises(FrechetError, match='non-finite'):
        frechet_distance(np.zeros(2), np.array([[np.nan, 0], [0, 1]]), np.zeros(2), eye)
    with pytest.raises(FrechetError, match='do not match'):
        frechet_distance(np.zeros(2), eye, np.zeros(3), np.eye(3))
    # A non-PSD input is refused naming it (tests/test_frechet.py covers the class).
    with pytest.raises(FrechetError, match='sigma1 is not positive semi-definite.*not a covariance matrix'):
        frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), eye)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        frechet_distance(np.zeros(2), eye, np.ones(2), 2 * eye)  # a clean case warns about nothing


# ----------------------------------------------------------------------------------------------------
# Precision / recall


def _brute_force_pr(real, gen, k=3):
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q, c, r):
        d = np.sqrt(((q[:, None, :] - c[None, :, :]) ** 2).sum(-1))
        return float(np.mean((d <= r[None, :]).any(axis=1)))

    return covered(gen, real, radii(real)), covered(real, gen, radii(gen))


def test_precision_recall_brute_force_and_blocks():
    rng = np.random.RandomState(3)
    real = rng.randn(150, 8)
    gen = rng.randn(150, 8) * 0.7 + 0.4
    expected = _brute_force_pr(real, gen)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1
    assert precision_recall(real, gen, dtype=torch.float64) == expected
    assert precision_recall(real, gen, dtype=torch.float64, max_block=1000) == expected  # 6 rows per block
    p, r = precision_recall(real.astype(np.float32), gen.astype(np.float32))
    assert abs(p - expected[0]) <= 2 / 150 and abs(r - expected[1]) <= 2 / 150  # float32: at most a tie or two
    x = torch.from_numpy(real)
    # Blocks change only the matmul shapes: float64 rounding differences.
    assert torch.allclose(knn_radii(x, max_block=7), knn_radii(x), rtol=1e-12, atol=0)


def test_precision_recall_direction():
    rng = np.random.RandomState(4)
    real = rng.randn(400, 4)
    same = precision_recall(real, real, dtype=torch.float64)
    assert same == (1.0, 1.0)  # every point lies in its own ball
    shifted = [precision_recall(real, rng.randn(400, 4) + s, dtype=torch.float64) for s in (0.0, 1.0, 3.0)]
    assert shifted[0][0] > shifted[1][0] > shifted[2][0]  # precision falls as the set moves away
    assert shifted[0][1] > shifted[1][1] > shifted[2][1]  # and so does recall
    p, r = precision_recall(real, 0.3 * rng.randn(400, 4), dtype=torch.float64)  # collapsed onto the mode
    assert p > 0.95 and r < 0.5


# ----------------------------------------------------------------------------------------------------
# Reference files and metric bookkeeping


def test_reference_round_trip_and_npz(tmp_path):
    rng = np.random.RandomState(5)
    ref = {'fid': {'mu': rng.randn(4), 'sigma': np.eye(4)}, 'fd_dinov2': {'mu': rng.randn(3), 'sigma': np.eye(3)},
           'features': {'dinov2': rng.randn(10, 3).astype(np.float32)}}
    save_reference(tmp_path / 'r.pkl', ref)
    back = load_reference(tmp_path / 'r.pkl')
    assert np.array_equal(back['fid']['mu'], ref['fid']['mu'])
    assert np.array_equal(back['features']['dinov2'], ref['features']['dinov2'])
    np.savez(tmp_path / 'edm1.npz', mu=ref['fid']['mu'], sigma=ref['fid']['sigma'])
    back = load_reference(tmp_path / 'edm1.npz')
    assert set(back) == {'fid'} and np.array_equal(back['fid']['sigma'], np.eye(4))


def test_reference_official_layout_with_easydict(tmp_path, monkeypatch):
    # The official code may pickle dnnlib.util.EasyDict containers; they load as plain dicts.
    dnnlib, util = types.ModuleType('dnnlib'), types.ModuleType('dnnlib.util')

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict, dnnlib.util = EasyDict, util
    monkeypatch.setitem(sys.modules, 'dnnlib', dnnlib)
    monkeypatch.setitem(sys.modules, 'dnnlib.util', util)
    data = pickle.dumps(EasyDict(fid=EasyDict(mu=np.zeros(2), sigma=np.eye(2))), protocol=2)
    monkeypatch.delitem(sys.modules, 'dnnlib.util')
    monkeypatch.delitem(sys.modules, 'dnnlib')
    (tmp_path / 'img.pkl').write_bytes(data)
    ref = load_reference(tmp_path / 'img.pkl')
    assert type(ref['fid']) is dict and np.array_equal(ref['fid']['sigma'], np.eye(2))


class _Evil:
    def __reduce__(self):
        return (print, ('this must never run',))


def test_reference_pickle_cannot_run_code(tmp_path, capsys):
    (tmp_path / 'evil.pkl').write_bytes(pickle.dumps({'fid': {'mu': _Evil(), 'sigma': np.eye(2)}}))
    with pytest.raises(ReferenceFileError, match='forbidden object builtins.print'):
        load_reference(tmp_path / 'evil.pkl')
    assert 'never run' not in capsys.readouterr().out
    with pytest.raises(ReferenceFileError, match='not found'):
        load_reference(tmp_path / 'missing.pkl')


def test_metric_names_and_reference_checks():
    assert evaluate.parse_metrics('fid, fd_dinov2,fid') == ['fid', 'fd_dinov2']
    # ('is' became a metric with the ADM evaluator's protocol; 'kid' is still unknown.)
    with pytest.raises(evaluate.MetricError, match="unknown metric 'kid'"):
        evaluate.parse_metrics('fid,kid')
    assert evaluate.detectors_for(['precision']) == ['dinov2']
    assert evaluate.detectors_for(['recall', 'fid'], 'inception') == ['inception']
    ref = {'fid': {'mu': np.zeros(2), 'sigma': np.eye(2)}}
    with pytest.raises(evaluate.MetricError, match='no fd_dinov2 statistics'):
        evaluate.check_reference(ref, ['fd_dinov2'])
    with pytest.raises(evaluate.MetricError, match='--keep-features'):
        evaluate.check_reference(ref, ['precision'])


def test_reference_reads_mu_sigma_of_an_adm_batch(tmp_path):
    # An ADM reference batch as an EDM2-protocol --ref: its mu / sigma give 'fid'; the images are not needed.
    rng = np.random.RandomState(0)
    mu, sigma = rng.randn(4), np.eye(4) * 2
    np.savez(tmp_path / 'virtual.npz', arr_0=rng.randint(0, 256, (3, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(2), sigma_s=np.eye(2))
    ref = load_reference(tmp_path / 'virtual.npz')
    assert set(ref) == {'fid'} and np.array_equal(ref['fid']['mu'], mu) and np.array_equal(ref['fid']['sigma'], sigma)
