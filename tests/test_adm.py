"""The ADM evaluator's protocol: sFID features, Inception Score, ADM precision/recall, ADM batch files, and
`calculate_metrics.py --protocol adm` / `--save-npz`, `generate_images.py --npz` end to end."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from edm2.commands import calculate_metrics
from edm2.metrics import adm
from edm2.metrics import detectors as det_lib
from edm2.metrics.adm_npz import AdmBatch, AdmFileError, NpzImageWriter, SampleBatchSink
from edm2.metrics.adm_precision_recall import adm_precision_recall, manifold_radii, pairwise_sq_distances
from edm2.metrics.inception import SFID_DIM, sfid_features
from edm2.metrics.inception_score import inception_score

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 12
pytestmark = pytest.mark.usefixtures('one_thread')


# ----------------------------------------------------------------------------------------------------
# sFID features


def _stand_in_inception(detectors, tmp_path):
    fixture = torch.load(detectors('inception-fid.pt'), weights_only=False)
    spec = importlib.util.spec_from_file_location('weights_rule', detectors('weights_rule.py'))
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    sd = rule.inception_state_dict(fixture['shapes'])
    weights = tmp_path / 'pt_inception-2015-12-05-6726825d.pth'
    torch.save(sd, weights)
    return fixture, sd, det_lib.load_detector('inception', weights=weights)


def test_sfid_features_equal_branch_recomputed_from_weights(detectors, tmp_path):
    fixture, sd, det = _stand_in_inception(detectors, tmp_path)
    captured = {}
    det.net.Mixed_6d.register_forward_hook(lambda module, args, out: captured.update(x=args[0].clone()))
    for size in ('64x64', '299x299'):
        images = fixture['inputs'][size]
        out = det.outputs(images, ('pool', 'spatial'))
        assert out['spatial'].shape == (len(images), SFID_DIM) == (len(images), 2023)
        # The branch written out from the weight file: 1x1 convolution, batch norm (eps 1e-3), ReLU; then
        # channels 0-6 in (H, W, C) order, as TensorFlow's NHWC activations flatten.
        p = 'Mixed_6d.branch1x1.'
        y = F.conv2d(captured['x'], sd[p + 'conv.weight'])
        y = (y - sd[p + 'bn.running_mean'][:, None, None]) / torch.sqrt(sd[p + 'bn.running_var'][:, None, None] + 1e-3)
        y = torch.relu(y * sd[p + 'bn.weight'][:, None, None] + sd[p + 'bn.bias'][:, None, None])
        assert y.shape[1:] == (192, 17, 17)
        expected = np.stack([[[y[n, c, h, w].item() for c in range(7)] for h in range(17) for w in range(17)]
                             for n in range(len(images))]).reshape(len(images), -1)
        # float32: the same products summed in another order; activations are O(1).
        err = np.abs(out['spatial'].numpy() - expected).max()
        assert err <= 1e-5 * max(1.0, np.abs(expected).max()), (size, err)
        assert np.abs(expected).max() > 0.1  # not a trivially zero tap
        assert torch.equal(out['pool'], fixture['outputs'][size]['pool_2048']) or \
            (out['pool'] - fixture['outputs'][size]['pool_2048']).abs().max() < 1e-4


def test_sfid_flatten_order_is_hwc():
    n, c, h, w = 2, 12, 17, 17
    idx = torch.arange(n * c * h * w, dtype=torch.float32).reshape(n, c, h, w)
    tap = idx * 0 + (torch.arange(c)[:, None, None] * 10000 + torch.arange(h)[:, None] * 100 + torch.arange(w))
    tap = tap + torch.arange(n)[:, None, None, None] * 1e6
    f = sfid_features(tap)
    assert f.shape == (n, 2023)
    for sample in range(n):
        for k in (0, 1, 6, 7, 8, 7 * 17, 2022):
            hh, rest = divmod(k, 17 * 7)
            ww, cc = divmod(rest, 7)
            assert f[sample, k].item() == sample * 1e6 + cc * 10000 + hh * 100 + ww
    with pytest.raises(ValueError):
        sfid_features(torch.zeros(1, 6, 17, 17))  # fewer than 7 channels


def test_detector_outputs_from_one_pass():
    net = det_lib._inception.InceptionV3FID.from_state_dict(det_lib.random_state_dict('inception', width_divisor=16))
    det = det_lib.Detector('inception', net, os.devnull, 'cpu')
    calls = []
    net.Conv2d_1a_3x3.register_forward_hook(lambda *a: calls.append(1))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    out = det.outputs(images, ('pool', 'logits', 'spatial'))
    assert len(calls) == 1
    assert [tuple(v.shape) for v in out.values()] == [(3, 128), (3, 1008), (3, 2023)]
    assert torch.equal(out['pool'], det(images))
    assert torch.allclose(out['logits'], out['pool'] @ net.fc.weight.T, rtol=0, atol=0)
    with pytest.raises(det_lib.DetectorError, match='no output'):
        det.outputs(images, ('cls',))


# ----------------------------------------------------------------------------------------------------
# Inception Score


def _inception_score_numpy(logits, split):
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for s in range(0, len(p), split):
        part = p[s:s + split]
        kl = np.sum(part * (np.log(part) - np.log(part.mean(0, keepdims=True))), axis=1)
        scores.append(np.exp(kl.mean()))
    return np.mean(scores)


def test_inception_score_equals_brute_force():
    rng = np.random.RandomState(0)
    logits = (rng.randn(11000, 1008) * 3).astype(np.float32)  # splits of 5000, 5000, 1000
    expected = _inception_score_numpy(logits.astype(np.float64), 5000)
    assert abs(inception_score(logits) - expected) <= 1e-6 * expected
    small = logits[:37]
    assert abs(inception_score(small, split_size=10) - _inception_score_numpy(small.astype(np.float64), 10)) < 1e-6
    # Bounds: 1 for identical predictions, the number of classes for confident, distinct ones.
    assert abs(inception_score(np.zeros((8, 1008))) - 1) < 1e-12
    assert abs(inception_score(np.eye(8) * 200) - 8) < 1e-9


# ----------------------------------------------------------------------------------------------------
# ADM precision / recall


def _pr_brute_force(ref, gen, k=3):
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    r_ref = np.sort(d(ref, ref), axis=1)[:, k]
    r_gen = np.sort(d(gen, gen), axis=1)[:, k]
    precision = np.mean((d(gen, ref) <= r_ref[None, :]).any(1))
    recall = np.mean((d(ref, gen) <= r_gen[None, :]).any(1))
    return precision, recall


def test_adm_pr_float32_equals_brute_force():
    # Small integer features: every distance is exact in float32 and float64, and ties are frequent,
    # which exercises "<=" and the k-th neighbour with the point itself excluded.
    rng = np.random.RandomState(1)
    ref = rng.randint(-3, 4, (150, 6)).astype(np.float32)
    gen = (rng.randint(-3, 4, (230, 6)) + (rng.rand(230, 1) < 0.3) * 2).astype(np.float32)
    expected = _pr_brute_force(ref, gen)
    for block in (10000, 64, 7):
        assert adm_precision_recall(ref, gen, mode='float32', block=block) == expected
    assert 0 < expected[0] < 1 or 0 < expected[1] < 1


def _pr_bounds(ref, gen, k=3):
    """Brute-force precision/recall bounds allowing every distance the float16 error 8u(|a|^2 + |b|^2)."""
    u = 2.0 ** -11
    ref, gen = np.asarray(ref, np.float64), np.asarray(gen, np.float64)
    d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    e = lambda a, b: 8 * u * ((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :])

    def share(q, c):
        dc, ec = d(c, c), e(c, c)
        radius = np.sort(dc, axis=1)[:, k]
        slack = ec.max(1)  # the k-th smallest of perturbed values moves by at most the largest perturbation
        dq, eq = d(q, c), e(q, c)
        lo = np.mean((dq + eq <= radius[None] - slack[None]).any(1))
        hi = np.mean((dq - eq <= radius[None] + slack[None]).any(1))
        return lo, hi
    return share(gen, ref), share(ref, gen)


def test_adm_pr_float16_within_stated_tolerance_and_fallback():
    rng = np.random.RandomState(2)
    ref = rng.randn(200, 16).astype(np.float32) * 3
    gen = (rng.randn(260, 16) * 3 + 0.5).astype(np.float32)
    (p_lo, p_hi), (r_lo, r_hi) = _pr_bounds(ref, gen)
    p, r = adm_precision_recall(ref, gen, mode='float16', block=50)
    assert p_lo <= p <= p_hi and r_lo <= r <= r_hi
    assert p_hi - p_lo < 0.1 and r_hi - r_lo < 0.1  # the bound is informative here
    # The float16 path is taken: its distances are not the float32 ones, but within the stated bound.
    a, b = torch.from_numpy(ref[:50]), torch.from_numpy(gen[:50])
    d16, d32 = pairwise_sq_distances(a, b, 'float16'), pairwise_sq_distances(a, b, 'float32')
    bound = 8 * 2.0 ** -11 * ((a ** 2).sum(1)[:, None] + (b ** 2).sum(1)[None, :])
    assert not torch.equal(d16, d32) and bool(((d16 - d32).abs() <= bound).all())
    # inf/NaN fallback: squared norms above float16's 65 504 make the block float32, exactly.
    big_a, big_b = a * 100, b * 100
    assert torch.equal(pairwise_sq_distances(big_a, big_b, 'float16'), pairwise_sq_distances(big_a, big_b, 'float32'))
    # Mixed: one set far out, so some blocks fall back and others do not; still within the bound.
    ref_mixed = ref.copy()
    ref_mixed[:50] *= 100
    (p_lo, p_hi), (r_lo, r_hi) = _pr_bounds(ref_mixed, gen)
    p, r = adm_precision_recall(ref_mixed, gen, mode='float16', block=50)
    assert p_lo <= p <= p_hi and r_lo <= r <= r_hi
    big_ref, big_gen = ref * 100, gen * 100
    assert adm_precision_recall(big_ref, big_gen, mode='float16', block=50) == \
        adm_precision_recall(big_ref, big_gen, mode='float32', block=50)


def test_manifold_radii_exclude_self():
    x = torch.tensor([[0.0], [1.0], [3.0], [6.0], [10.0]])
    # squared distances to the 3rd nearest other point
    assert manifold_radii(x, 3, 'float32', block=2).tolist() == [36.0, 25.0, 9.0, 25.0, 81.0]
    with pytest.raises(ValueError, match='more than k'):
        manifold_radii(x[:3])


# ----------------------------------------------------------------------------------------------------
# ADM batch files


def test_npz_writer_streams_and_reads_back(tmp_path):
    rng = np.random.RandomState(3)
    images = rng.randint(0, 256, (10, 8, 6, 3), dtype=np.uint8)
    labels = rng.randint(0, 1000, 10)
    path = tmp_path / 'batch.npz'
    with NpzImageWriter(path, 10, (8, 6, 3), labels=True) as w:
        for s in (0, 3, 4, 9):
            w.append(images[s:{0: 3, 3: 4, 4: 9, 9: 10}[s]], labels[s:{0: 3, 3: 4, 4: 9, 9: 10}[s]])
        assert not path.exists()  # a temporary name until complete
        w.extra['mu'] = np.arange(3.0)
    with np.load(path, allow_pickle=False) as z:
        assert z.files == ['arr_0', 'arr_1', 'mu']
        assert z['arr_0'].dtype == np.uint8 and np.array_equal(z['arr_0'], images)
        assert np.array_equal(z['arr_1'], labels) and z['arr_1'].dtype == np.int64
    batch = AdmBatch(path)
    assert batch.image_shape == (10, 8, 6, 3)
    rows = list(batch.image_rows([(1, 4), (6, 10)]))
    assert np.array_equal(np.concatenate(rows), images[[1, 2, 3, 6, 7, 8, 9]])
    # Incomplete: nothing is left behind.
    with pytest.raises(ValueError, match='9 of 10'):
        with NpzImageWriter(tmp_path / 'short.npz', 10, (8, 6, 3)) as w:
            w.append(images[:9])
    assert os.listdir(tmp_path) == ['batch.npz']


def test_sample_sink_assembles_ranks_in_seed_order(tmp_path):
    # What rank 0 does under torchrun: rows of each rank's temporary file, put in the order of the seeds.
    rng = np.random.RandomState(4)
    seeds = list(range(100, 111))
    images = {s: rng.randint(0, 256, (4, 4, 3), dtype=np.uint8) for s in seeds}
    parts = []
    for r, mine in enumerate((seeds[0:3] + seeds[6:9], seeds[3:6] + seeds[9:])):
        raw = tmp_path / f'rank{r}.raw'
        raw.write_bytes(np.stack([images[s] for s in mine]).tobytes())
        parts.append(dict(path=str(raw), seeds=mine, shape=(4, 4, 3), labels=np.array(mine) % 7))
    sink = SampleBatchSink(tmp_path / 'out.npz', seeds, chunk=4)
    sink._assemble(parts + [dict(path=None, seeds=[], shape=None, labels=None)])
    with np.load(tmp_path / 'out.npz', allow_pickle=False) as z:
        assert np.array_equal(z['arr_0'], np.stack([images[s] for s in seeds]))
        assert np.array_equal(z['arr_1'], np.array(seeds) % 7)


def test_sample_sink_leaves_nothing_when_generation_fails(tmp_path):
    from edm2.generation import GeneratedBatch

    def batches():
        yield GeneratedBatch(seeds=[0, 1], positions=range(0, 2), images=torch.zeros(2, 3, 4, 4, dtype=torch.uint8), labels=None)
        raise RuntimeError('sampler failed')
    sink = SampleBatchSink(tmp_path / 'out.npz', [0, 1, 2, 3])
    with pytest.raises(RuntimeError, match='sampler failed'):
        for _ in sink.tee(batches()):
            pass
    assert os.listdir(tmp_path) == []
    sink = SampleBatchSink(tmp_path / 'out.npz', [0, 1, 2, 3])
    for _ in sink.tee(iter([])):  # nothing generated at all
        pass
    with pytest.raises(ValueError, match='no images'):
        sink.finish()


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return str(path)


def test_bad_batch_files_one_line_errors(tmp_path):
    rng = np.random.RandomState(5)
    imgs = rng.randint(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    dims = {adm.POOL: 4, adm.SPATIAL: 3, adm.LOGITS: 1008}
    stats = dict(mu=np.zeros(4), sigma=np.eye(4))
    no_mu_s = AdmBatch(_write_npz(tmp_path / 'no_mu_s.npz', arr_0=imgs, **stats))
    with pytest.raises(AdmFileError, match=r'no_mu_s\.npz: mu_s missing'):
        adm.read_reference(no_mu_s, ['sfid'], dims)
    no_images = AdmBatch(_write_npz(tmp_path / 'no_images.npz', **stats, mu_s=np.zeros(3), sigma_s=np.eye(3)))
    with pytest.raises(AdmFileError, match=r'no_images\.npz: arr_0 missing'):
        adm.read_reference(no_images, ['adm_precision'], dims)
    with pytest.raises(AdmFileError, match=r'object\.npz: arr_0 is an object array'):
        AdmBatch(_write_npz(tmp_path / 'object.npz', arr_0=np.array([None, 1], dtype=object)))
    objmu = AdmBatch(_write_npz(tmp_path / 'objmu.npz', mu=np.array([None], dtype=object), sigma=np.eye(4)))
    with pytest.raises(AdmFileError, match=r'objmu\.npz: mu cannot be read: holds Python objects \(an object array\)'):
        adm.read_reference(objmu, ['adm_fid'], dims)
    with pytest.raises(AdmFileError, match=r'nhwc\.npz: arr_0 has shape \[5, 4, 4\]'):
        AdmBatch(_write_npz(tmp_path / 'nhwc.npz', arr_0=imgs[..., 0]))
    with pytest.raises(AdmFileError, match=r'float\.npz: arr_0 .* dtype float64'):
        AdmBatch(_write_npz(tmp_path / 'float.npz', arr_0=imgs.astype(np.float64)))
    wrong = AdmBatch(_write_npz(tmp_path / 'wrong.npz', mu=np.zeros(5), sigma=np.eye(5)))
    with pytest.raises(AdmFileError, match=r'wrong\.npz: mu has shape \[5\]; expected \[4\]'):
        adm.read_reference(wrong, ['adm_fid'], dims)
    (tmp_path / 'text.npz').write_text('not a zip')
    with pytest.raises(AdmFileError, match=r'text\.npz is not a valid \.npz file'):
        AdmBatch(tmp_path / 'text.npz')
    # A sample batch (no statistics) as reference: statistics come from its images, as in the evaluator.
    samples = AdmBatch(_write_npz(tmp_path / 'samples.npz', arr_0=imgs))
    assert adm.read_reference(samples, ['adm_fid', 'sfid'], dims) == ({}, [adm.POOL, adm.SPATIAL])


# ----------------------------------------------------------------------------------------------------
# Command lines


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp('adm-assets')
    inc = root / 'inception-tiny.pth'
    torch.save(det_lib.random_state_dict('inception', width_divisor=16), inc)
    images = root / 'images'
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(NUM_IMAGES):
        blocks = rng.randint(0, 256, (4, 4, 3), dtype=np.uint8)
        PIL.Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))).save(images / f'{i:06d}.png')
    return dict(root=root, inception=str(inc), images=str(images))


def _run(module, args, assets):
    args = args + ['--inception-weights', assets['inception'], '--workers', '0']
    return CliRunner().invoke(module, args, catch_exceptions=False)


def _one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 'Traceback' not in result.output and lines[-1].startswith('Error:'), result.output
    for f in fragments:
        assert f in lines[-1], lines[-1]


def _dataset_outputs(assets, batch=5):
    from edm2.data import ImageFolderDataset
    ds = ImageFolderDataset(assets['images'])
    det = det_lib.load_detector('inception', assets['inception'])
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    outs = [det.outputs(images[i:i + batch], ('pool', 'spatial', 'logits')) for i in range(0, len(ds), batch)]
    return images, {k: torch.cat([o[k] for o in outs]).numpy() for k in ('pool', 'spatial', 'logits')}


def test_ref_protocol_adm_written_and_read_without_loss(assets, tmp_path):
    dest = tmp_path / 'ref-adm.npz'
    result = _run(calculate_metrics.cli, ['ref', '--protocol', 'adm', '--data', assets['images'], '--dest', str(dest),
                                          '--ref-images', '8', '--seed', '3', '--batch', '5'], assets)
    assert result.exit_code == 0, result.output
    images, out = _dataset_outputs(assets)
    chosen = adm.reference_subset(NUM_IMAGES, 8, 3)
    assert len(chosen) == 8 and len(set(chosen.tolist())) == 8
    with np.load(dest, allow_pickle=False) as z:
        assert sorted(z.files) == ['arr_0', 'mu', 'mu_s', 'sigma', 'sigma_s']
        assert np.array_equal(z['arr_0'], images[chosen].permute(0, 2, 3, 1).numpy())
        for key, f in (('mu', out['pool']), ('mu_s', out['spatial'])):
            f = f.astype(np.float64)
            scale = np.abs(f).max()
            assert np.allclose(z[key], f.mean(0), rtol=0, atol=1e-12 * scale)
            cov = z['sigma' if key == 'mu' else 'sigma_s']
            assert np.allclose(cov, np.cov(f, rowvar=False), rtol=0, atol=1e-12 * scale ** 2)
        written = {k: z[k] for k in z.files}
    # The metrics read exactly what was written, and the reference features are those of arr_0.
    batch = AdmBatch(dest)
    dims = {adm.POOL: 128, adm.SPATIAL: 2023, adm.LOGITS: 1008}
    ref, from_images = adm.read_reference(batch, list(adm.METRICS), dims)
    assert from_images == []
    for metric, (mu, sigma) in (('adm_fid', ('mu', 'sigma')), ('sfid', ('mu_s', 'sigma_s'))):
        assert np.array_equal(ref[metric]['mu'], written[mu]) and np.array_equal(ref[metric]['sigma'], written[sigma])
    rows = np.concatenate(list(batch.image_rows([(0, 8)])))
    assert np.array_equal(rows, written['arr_0'])

    # calc with the ADM metrics against it: the same 12 images contain the 8 reference images.
    res_path = tmp_path / 'r.json'
    result = _run(calculate_metrics.cli, ['calc', '--protocol', 'adm', '--metrics', 'adm_fid,is,adm_precision,adm_recall',
                                          '--images', assets['images'], '--ref', str(dest), '--num', str(NUM_IMAGES),
                                          '--batch', '5', '--adm-distances', 'float32', '--out', str(res_path)], assets)
    assert result.exit_code == 0, result.output
    res = json.loads(res_path.read_text())
    run = res['runs'][0]
    assert res['protocol'] == 'adm' and res['adm_distances'] == 'float32'
    assert abs(run['adm_fid']) <= 1e-4 * np.trace(written['sigma'])  # same images, same statistics
    assert abs(run['is'] - inception_score(out['logits'])) <= 1e-6 * run['is']
    expected_pr = adm_precision_recall(out['pool'][chosen], out['pool'], mode='float32')
    assert (run['adm_precision'], run['adm_recall']) == pytest.approx(expected_pr, abs=0)
    assert run['adm_recall'] == 1.0  # every reference image is one of the samples
    assert 'adm_precision' in result.output and 'is' in result.output


def test_cli_bad_adm_references(assets, tmp_path):
    common = ['calc', '--protocol', 'adm', '--images', assets['images'], '--num', '4']
    no_mu_s = _write_npz(tmp_path / 'no_mu_s.npz', mu=np.zeros(128), sigma=np.eye(128),
                         arr_0=np.zeros((5, 4, 4, 3), np.uint8))
    _one_line_error(_run(calculate_metrics.cli, common + ['--ref', no_mu_s, '--metrics', 'sfid'], assets),
                    'no_mu_s.npz', 'mu_s')
    no_arr = _write_npz(tmp_path / 'stats_only.npz', mu=np.zeros(128), sigma=np.eye(128))
    _one_line_error(_run(calculate_metrics.cli, common + ['--ref', no_arr, '--metrics', 'adm_recall'], assets),
                    'stats_only.npz', 'arr_0')
    obj = _write_npz(tmp_path / 'obj.npz', arr_0=np.array([None], dtype=object))
    _one_line_error(_run(calculate_metrics.cli, common + ['--ref', obj], assets), 'obj.npz', 'arr_0', 'object')
    _one_line_error(_run(calculate_metrics.cli, common + ['--ref', no_arr, '--metrics', 'fid,adm_fid'], assets),
                    '--metrics', 'separate')
    _one_line_error(_run(calculate_metrics.cli, common + ['--ref', str(tmp_path / 'nope.npz')], assets), 'nope.npz')
    assert sorted(os.listdir(tmp_path)) == ['no_mu_s.npz', 'obj.npz', 'stats_only.npz']


def test_gen_save_npz_and_is_of_saved_images(assets, tmp_path, official):
    net = official('main-rgb16.pkl')
    ref = _write_npz(tmp_path / 'ref.npz', arr_0=np.random.RandomState(0).randint(0, 256, (6, 16, 16, 3), np.uint8))
    out, npz = tmp_path / 'gen.json', tmp_path / 'samples.npz'
    result = _run(calculate_metrics.cli, [
        'gen', '--net', str(net), '--protocol', 'adm', '--metrics', 'is,adm_precision', '--ref', ref, '--num', '5',
        '--repeats', '2', '--steps', '2', '--batch', '3', '--save-npz', str(npz), '--out', str(out)], assets)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    det = det_lib.load_detector('inception', assets['inception'])
    arrays = []
    for r in range(2):
        with np.load(tmp_path / f'samples-{r}.npz', allow_pickle=False) as z:
            assert z['arr_0'].shape == (5, 16, 16, 3) and z['arr_0'].dtype == np.uint8
            arrays.append(z['arr_0'])
            if 'arr_1' in z.files:
                assert z['arr_1'].shape == (5,)
        logits = det.outputs(torch.from_numpy(arrays[-1]).permute(0, 3, 1, 2), ('logits',))['logits']
        # The metric saw the images that were saved (features from other batch splits: float32 rounding).
        assert abs(res['runs'][r]['is'] - inception_score(logits.numpy())) <= 1e-5 * res['runs'][r]['is']
    assert not np.array_equal(arrays[0], arrays[1])


def test_generate_images_npz_round_trip(tmp_path, official):
    from edm2.commands import generate_images
    net = official('main-rgb16.pkl')
    outdir, npz = tmp_path / 'png', tmp_path / 'batch.npz'
    result = CliRunner().invoke(generate_images.main, [
        '--net', str(net), '--seeds', '0-6', '--steps', '2', '--batch', '3', '--outdir', str(outdir),
        '--npz', str(npz), '--device', 'cpu'], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    pngs = np.stack([np.array(PIL.Image.open(outdir / f'{s:06d}.png')) for s in range(7)])
    with np.load(npz, allow_pickle=False) as z:
        assert np.array_equal(z['arr_0'], pngs)
    bad = CliRunner().invoke(generate_images.main, ['--net', str(net), '--npz', str(npz), '--skip-existing',
                                                    '--outdir', str(outdir)])
    assert bad.exit_code != 0 and '--skip-existing' in bad.output


@pytest.mark.slow
def test_torchrun_npz_equals_pngs(tmp_path, official):
    net = official('main-rgb16.pkl')
    port = 29500 + os.getpid() % 1000
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}',
           os.path.join(REPO, 'generate_images.py'), '--net', str(net), '--seeds', '0-6', '--steps', '2',
           '--batch', '2', '--outdir', str(tmp_path / 'png'), '--npz', str(tmp_path / 'b.npz'), '--device', 'cpu']
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    pngs = np.stack([np.array(PIL.Image.open(tmp_path / 'png' / f'{s:06d}.png')) for s in range(7)])
    with np.load(tmp_path / 'b.npz', allow_pickle=False) as z:
        assert np.array_equal(z['arr_0'], pngs)
    assert sorted(os.listdir(tmp_path)) == ['b.npz', 'png']  # the ranks' temporary files are gone


@pytest.mark.slow
def test_torchrun_protocol_adm_matches_one_process(assets, tmp_path):
    # Every ADM metric (sFID's 2023-d Fréchet distance takes ~20 s here), reference features from arr_0
    # split over two ranks, against the same run in one process.
    ref = tmp_path / 'ref.npz'
    assert _run(calculate_metrics.cli, ['ref', '--protocol', 'adm', '--data', assets['images'], '--dest', str(ref),
                                        '--ref-images', '7', '--batch', '4'], assets).exit_code == 0
    args = ['calc', '--protocol', 'adm', '--images', assets['images'], '--ref', str(ref), '--num', '10', '--batch', '3']
    one = _run(calculate_metrics.cli, args + ['--out', str(tmp_path / 'one.json')], assets)
    assert one.exit_code == 0, one.output
    port = 29500 + (os.getpid() + 7) % 1000
    # ('--' ends torchrun's own options: it would take --num for an abbreviation of --numa-binding.)
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={port}', '--',
           os.path.join(REPO, 'calculate_metrics.py')] + args + [
           '--out', str(tmp_path / 'two.json'), '--device', 'cpu', '--workers', '0',
           '--inception-weights', assets['inception']]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    a, b = (json.loads((tmp_path / f).read_text())['runs'][0] for f in ('one.json', 'two.json'))
    assert set(a) == set(b) == {'subset', *adm.METRICS}
    assert all(np.isfinite(a[m]) for m in adm.METRICS)
    # Different batch splits: float32 feature rounding only.
    for m in ('adm_fid', 'sfid', 'is'):
        assert b[m] == pytest.approx(a[m], rel=1e-4, abs=1e-6)
    assert (a['adm_precision'], a['adm_recall']) == (b['adm_precision'], b['adm_recall'])
