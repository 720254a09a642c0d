"""calculate_metrics.py end to end with tiny stand-in detectors: ref statistics against numpy, calc/gen
results and JSON, repeats, one-line errors, cached downloads, and torchrun."""

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import calculate_metrics
from edm2.metrics import detectors as det_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_IMAGES = 12


pytestmark = pytest.mark.usefixtures('one_thread')


@pytest.fixture(scope='module')
def assets(tmp_path_factory):
    """Tiny detector weight files (Inception at 1/16 width -> 128-d features, DINOv2 width 32) and a
    folder of 16x16 images with coarse random colour blocks (so features differ between images)."""
    root = tmp_path_factory.mktemp('metrics-assets')
    inc, dino = root / 'inception-tiny.pth', root / 'dinov2-tiny.pth'
    torch.save(det_lib.random_state_dict('inception', width_divisor=16), inc)
    torch.save(det_lib.random_state_dict('dinov2', embed_dim=32, depth=1, grid_size=4), dino)
    images = root / 'images'
    images.mkdir()
    rng = np.random.RandomState(0)
    for i in range(NUM_IMAGES):
        blocks = rng.randint(0, 256, (4, 4, 3), dtype=np.uint8)
        PIL.Image.fromarray(np.kron(blocks, np.ones((4, 4, 1), dtype=np.uint8))).save(images / f'{i:06d}.png')
    return dict(root=root, inception=str(inc), dinov2=str(dino), images=str(images))


def _run(args, assets, weights=True):
    if weights:
        args = args + ['--inception-weights', assets['inception'], '--dinov2-weights', assets['dinov2'],
                       '--workers', '0']
    return CliRunner().invoke(calculate_metrics.cli, args, catch_exceptions=False)


def _assert_one_line_error(result, *fragments):
    assert result.exit_code != 0
    lines = [line for line in result.output.replace('\r', '\n').splitlines() if line.strip()]
    assert 'Traceback' not in result.output
    assert lines[-1].startswith('Error:'), result.output
    for f in fragments:
        assert f in lines[-1], lines[-1]


def _make_ref(assets, dest, extra=()):
    result = _run(['ref', '--data', assets['images'], '--dest', str(dest), '--batch', '5',
                   '--metrics', 'fid,fd_dinov2,precision,recall', '--keep-features', *extra], assets)
    assert result.exit_code == 0, result.output
    with open(dest, 'rb') as f:
        return pickle.load(f)


def _features_like_cli(assets, name, batch=5):
    """Features of the folder computed directly, in the same batches as the command (bitwise equal)."""
    from edm2.data import ImageFolderDataset
    ds = ImageFolderDataset(assets['images'])
    det = det_lib.load_detector(name, assets[name])
    images = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds))]))
    return torch.cat([det(images[i:i + batch]) for i in range(0, len(ds), batch)]).numpy().astype(np.float64)


def test_ref_statistics_equal_numpy(assets, tmp_path):
    ref = _make_ref(assets, tmp_path / 'ref.pkl')
    assert set(ref) == {'fid', 'fd_dinov2', 'features'}
    for metric, name in (('fid', 'inception'), ('fd_dinov2', 'dinov2')):
        f = _features_like_cli(assets, name)
        assert f.shape == (NUM_IMAGES, 128 if name == 'inception' else 32)
        assert ref[metric]['mu'].dtype == np.float64
        # Same float32 features; only the float64 summation order differs from numpy's.
        scale = np.abs(f).max()
        assert np.allclose(ref[metric]['mu'], f.mean(0), rtol=0, atol=1e-12 * scale)
        assert np.allclose(ref[metric]['sigma'], np.cov(f, rowvar=False), rtol=0, atol=1e-12 * scale ** 2)
        assert np.array_equal(ref['features'][name], f.astype(np.float32))


def test_calc_same_images_and_json(assets, tmp_path):
    ref_path = tmp_path / 'ref.pkl'
    ref = _make_ref(assets, ref_path)
    out = tmp_path / 'sub' / 'result.json'
    result = _run(['calc', '--images', assets['images'], '--ref', str(ref_path), '--num', str(NUM_IMAGES),
                   '--metrics', 'fid,fd_dinov2,precision,recall', '--batch', '4', '--out', str(out)], assets)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    run = res['runs'][0]
    # Same images: FD is 0 up to rounding (features from batches of 4 vs 5, float32), and every image
    # lies in its own k-NN ball.
    for metric in ('fid', 'fd_dinov2'):
        trace = np.trace(ref[metric]['sigma'])
        assert abs(run[metric]) <= 1e-4 * trace
    assert run['precision'] == 1.0 and run['recall'] == 1.0
    assert res['num'] == NUM_IMAGES and res['ref'] == str(ref_path)
    for name in ('inception', 'dinov2'):
        assert res['detectors'][name]['sha256'] == det_lib.file_sha256(assets[name])
    assert 'fid' in result.output and 'recall' in result.output


def test_calc_repeats_disjoint(assets, tmp_path):
    ref_path = tmp_path / 'ref.npz'
    rng = np.random.RandomState(1)
    np.savez(ref_path, mu=rng.randn(128), sigma=np.eye(128))  # EDM1 format: FID only
    out = tmp_path / 'r.json'
    result = _run(['calc', '--images', assets['images'], '--ref', str(ref_path), '--num', '4', '--repeats', '3',
                   '--metrics', 'fid', '--out', str(out)], assets)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    values = [r['fid'] for r in res['runs']]
    assert len(values) == 3 and len(set(values)) == 3  # three different (disjoint) subsets
    assert res['summary']['fid']['min'] == min(values)
    assert res['summary']['fid']['mean'] == pytest.approx(np.mean(values))
    assert 'min' in result.output and 'mean' in result.output
    # 12 images = 3 x 4: the subsets are the sorted files in consecutive blocks (seed ranges); check the
    # second one against a run on exactly those files.
    sub = tmp_path / 'second'
    sub.mkdir()
    for i in range(4, 8):
        os.link(os.path.join(assets['images'], f'{i:06d}.png'), sub / f'{i:06d}.png')
    out2 = tmp_path / 'r2.json'
    result = _run(['calc', '--images', str(sub), '--ref', str(ref_path), '--num-images', '4', '--metrics', 'fid',
                   '--out', str(out2)], assets)  # --num-images: the alias of --num (see the next test)
    assert result.exit_code == 0, result.output
    assert json.loads(out2.read_text())['runs'][0]['fid'] == pytest.approx(values[1], rel=1e-6)


def test_num_images_is_an_alias_of_num(assets):
    # torchrun 2.13 refuses a bare --num after the script (an ambiguous prefix of its --numa-binding), so
    # every command also takes --num-images; both spellings give the same setting.
    required = {'calc': ['--images', assets['images'], '--ref', 'ref.pkl'],
                'gen': ['--net', 'net.pkl', '--ref', 'ref.pkl'],
                'sweep': ['--guidance', '2', '--ref', 'ref.pkl', '--outdir', 'out']}
    for name, args in required.items():
        command = calculate_metrics.cli.commands[name]
        values = []
        for flag in ('--num', '--num-images'):
            with command.make_context(name, args + [flag, '7']) as ctx:
                values.append(ctx.params['num'])
        assert values == [7, 7], name
        assert '--num, --num-images' in _run([name, '--help'], assets, weights=False).output


def test_bad_inputs_one_line(assets, tmp_path):
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=np.zeros(128), sigma=np.eye(128))
    base = ['calc', '--images', assets['images'], '--ref', str(ref_path)]
    # Fewer images than --num.
    _assert_one_line_error(_run(base + ['--num', '50', '--metrics', 'fid'], assets), 'holds 12 images', '--num 50')
    _assert_one_line_error(_run(base + ['--num', '5', '--repeats', '3', '--metrics', 'fid'], assets), '= 15')
    # Unknown metric; reference without the requested metric.
    _assert_one_line_error(_run(base + ['--metrics', 'fid,kid'], assets), "unknown metric 'kid'")
    _assert_one_line_error(_run(base + ['--metrics', 'fd_dinov2'], assets), 'no fd_dinov2 statistics')
    _assert_one_line_error(_run(base + ['--metrics', 'recall'], assets), '--keep-features')
    # Missing / unreadable files.
    _assert_one_line_error(_run(['calc', '--images', str(tmp_path / 'none'), '--ref', str(ref_path),
                                 '--metrics', 'fid'], assets), 'not found')
    _assert_one_line_error(_run(base[:3] + ['--ref', str(tmp_path / 'none.pkl')], assets), 'not found')
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in sorted(os.listdir(assets['images']))[:4]:
        os.link(os.path.join(assets['images'], name), bad / name)
    (bad / '000099.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    _assert_one_line_error(_run(['calc', '--images', str(bad), '--ref', str(ref_path), '--num', '5',
                                 '--metrics', 'fid'], assets), 'cannot read', '000099.png')
    # Statistics of another detector (2048-d reference vs the tiny 128-d Inception).
    big = tmp_path / 'big.npz'
    np.savez(big, mu=np.zeros(2048), sigma=np.eye(2048))
    _assert_one_line_error(_run(['calc', '--images', assets['images'], '--ref', str(big), '--num', '12',
                                 '--metrics', 'fid'], assets), '2048-d', '128-d')


def test_detector_weights_missing_offline(assets, tmp_path, monkeypatch):
    monkeypatch.delenv('EDM2_INCEPTION_WEIGHTS', raising=False)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch-home'))
    url = 'http://127.0.0.1:9/pt_inception-2015-12-05-6726825d.pth'  # nothing listens there
    monkeypatch.setitem(det_lib.SPECS, 'inception', dict(det_lib.SPECS['inception'], url=url))
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=np.zeros(128), sigma=np.eye(128))
    result = _run(['calc', '--images', assets['images'], '--ref', str(ref_path), '--num', '12', '--metrics', 'fid',
                   '--workers', '0'], assets, weights=False)
    _assert_one_line_error(result, url, str(det_lib.cache_dir() / 'pt_inception-2015-12-05-6726825d.pth'),
                           '--inception-weights')


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/'www' (tests never reach the internet)."""
    root = tmp_path / 'www'
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


def test_download_cached_and_hash_checked(assets, http_server, monkeypatch):
    root, base = http_server
    monkeypatch.delenv('EDM2_DINOV2_WEIGHTS', raising=False)
    monkeypatch.delenv('EDM2_INCEPTION_WEIGHTS', raising=False)
    (root / 'dinov2_vitl14_pretrain.pth').write_bytes(open(assets['dinov2'], 'rb').read())
    monkeypatch.setitem(det_lib.SPECS, 'dinov2', dict(det_lib.SPECS['dinov2'], url=f'{base}/dinov2_vitl14_pretrain.pth'))
    path = det_lib.find_weights('dinov2')
    assert path.is_file() and str(det_lib.cache_dir()) in str(path)
    (root / 'dinov2_vitl14_pretrain.pth').unlink()  # the cached copy is reused: no second download
    assert det_lib.find_weights('dinov2') == path
    # The Inception file's name carries a SHA-256 prefix, checked on download: a stand-in fails it.
    (root / 'pt_inception-2015-12-05-6726825d.pth').write_bytes(open(assets['inception'], 'rb').read())
    monkeypatch.setitem(det_lib.SPECS, 'inception',
                        dict(det_lib.SPECS['inception'], url=f'{base}/pt_inception-2015-12-05-6726825d.pth'))
    with pytest.raises(det_lib.DetectorError, match='6726825d'):
        det_lib.find_weights('inception')


def test_gen_with_guidance(assets, tmp_path, official):
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    ref_path = tmp_path / 'ref.pkl'
    _make_ref(assets, ref_path)
    out = tmp_path / 'gen.json'
    args = ['gen', '--net', str(net), '--gnet', str(gnet), '--guidance', '2', '--guidance-interval', '0.1,5',
            '--ref', str(ref_path), '--metrics', 'fid,precision', '--num', '4', '--repeats', '2', '--steps', '2',
            '--batch', '4', '--out', str(out)]
    result = _run(args, assets)
    assert result.exit_code == 0, result.output
    res = json.loads(out.read_text())
    assert [r['seeds'] for r in res['runs']] == [[0, 3], [4, 7]]
    assert res['guidance'] == 2.0 and res['guidance_interval'] == [0.1, 5.0] and res['gnet'] == [str(gnet)]
    assert all(np.isfinite(r['fid']) and 0 <= r['precision'] <= 1 for r in res['runs'])
    _assert_one_line_error(_run(['gen', '--net', str(net), '--guidance', '2', '--ref', str(ref_path), '--num', '4',
                                 '--metrics', 'fid'], assets), 'guid')


def test_gen_preset_gives_same_result_as_flags(assets, tmp_path, official, monkeypatch):
    from edm2 import presets
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=np.zeros(128), sigma=np.eye(128))
    configs = tmp_path / 'configs'
    configs.mkdir()
    (configs / 'generate.toml').write_text(
        f"[tiny-autog]\nnet = '{net}'\ngnet = '{gnet}'\nguidance = 1.5\nguidance_interval = [0.2, 3.0]\n")
    monkeypatch.setenv('EDM2_CONFIG_DIR', str(configs))
    presets.load.cache_clear()
    try:
        common = ['--ref', str(ref_path), '--metrics', 'fid', '--num', '3', '--steps', '2', '--batch', '3']
        a = _run(['gen', '--preset', 'tiny-autog', '--out', str(tmp_path / 'a.json')] + common, assets)
        assert a.exit_code == 0, a.output
        b = _run(['gen', '--net', str(net), '--gnet', str(gnet), '--guidance', '1.5', '--guidance-interval', '0.2,3',
                  '--out', str(tmp_path / 'b.json')] + common, assets)
        assert b.exit_code == 0, b.output
        _assert_one_line_error(_run(['gen', '--preset', 'nope'] + common, assets), 'nope')
    finally:
        presets.load.cache_clear()
    ra, rb = (json.loads((tmp_path / f).read_text()) for f in ('a.json', 'b.json'))
    assert ra['guidance'] == rb['guidance'] == 1.5 and ra['guidance_interval'] == rb['guidance_interval'] == [0.2, 3.0]
    assert ra['runs'][0]['fid'] == rb['runs'][0]['fid']


@pytest.mark.slow
def test_gen_interval_steps_and_balanced_labels(assets, tmp_path, official):
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=np.zeros(128), sigma=np.eye(128))
    common = ['--net', str(net), '--gnet', str(gnet), '--guidance', '2', '--ref', str(ref_path), '--metrics', 'fid',
              '--num', '20', '--steps', '4', '--batch', '8']
    result = _run(['gen', *common, '--guidance-interval-steps', '1,2', '--labels', 'balanced', '--repeats', '2',
                   '--out', str(tmp_path / 'a.json')], assets)
    assert result.exit_code == 0, result.output
    res = json.loads((tmp_path / 'a.json').read_text())
    assert res['guidance_interval_steps'] == [1, 2] and res['guidance_interval'] is None
    assert res['labels'] == 'balanced'
    for run in res['runs']:  # 20 images, 10 classes: every class twice, by position in the seed range
        assert run['labels'] == [p % 10 for p in range(20)]
    # The same steps named by sigma give the same result; the default rule records the drawn classes.
    from edm2.sampling import edm_schedule
    t = edm_schedule(4).tolist()  # sigma_lo between sigma_3 and sigma_2, sigma_hi between sigma_1 and sigma_0
    result = _run(['gen', *common, '--guidance-interval', f'{(t[3] + t[2]) / 2},{(t[1] + t[0]) / 2}',
                   '--out', str(tmp_path / 'b.json')], assets)
    assert result.exit_code == 0, result.output
    b = json.loads((tmp_path / 'b.json').read_text())
    ref = torch.load(official('generate-rgb16.pt'))
    assert b['runs'][0]['labels'][:8] == ref['labels'].tolist()
    result = _run(['gen', *common, '--guidance-interval-steps', '1,2', '--out', str(tmp_path / 'c.json')], assets)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / 'c.json').read_text())['runs'][0]['fid'] == b['runs'][0]['fid']
    assert res['runs'][0]['fid'] != b['runs'][0]['fid']  # balanced classes give other images


def test_gen_bad_guidance_input_one_line(assets, tmp_path, official):
    net, gnet = official('main-rgb16.pkl'), official('guide-rgb16.pkl')
    ref_path = tmp_path / 'ref.npz'
    np.savez(ref_path, mu=np.zeros(128), sigma=np.eye(128))
    out = tmp_path / 'r.json'
    common = ['gen', '--net', str(net), '--gnet', str(gnet), '--guidance', '2', '--ref', str(ref_path),
              '--metrics', 'fid', '--num', '4', '--steps', '4', '--out', str(out)]
    cases = [
        (['--guidance-interval', '0.1,5', '--guidance-interval-steps', '1,2'], 'not both'),
        (['--guidance-interval-steps', '3,1'], 'FIRST <= LAST'),
        (['--guidance-interval-steps', '2,4'], 'outside the schedule of 4 steps'),
        (['--guidance', 'nan'], '--guidance'),
        (['--steps', '-1'], '--steps'),
        (['--out', str(tmp_path)], '--out'),
    ]
    for extra, message in cases:
        _assert_one_line_error(_run(common + extra, assets), message)
        assert not out.exists()
    uncond = tmp_path / 'uncond.safetensors'
    from edm2.checkpoint import save_network
    from edm2.networks import build_network
    save_network(uncond, build_network(dict(img_resolution=16, img_channels=3, label_dim=0, model_channels=8,
                                            channel_mult=[1], num_blocks=1, attn_resolutions=[])))
    _assert_one_line_error(_run(['gen', '--net', str(uncond), '--labels', 'balanced', '--ref', str(ref_path),
                                 '--metrics', 'fid', '--num', '4', '--steps', '2', '--out', str(out)], assets),
                           'balanced labels need a conditional network')
    assert not out.exists()


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_match_one(assets, tmp_path):
    one = _make_ref(assets, tmp_path / 'one.pkl')
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join(REPO, 'calculate_metrics.py'), 'ref', '--data', assets['images'],
           '--dest', str(tmp_path / 'two.pkl'), '--batch', '5', '--workers', '0', '--device', 'cpu',
           '--metrics', 'fid,fd_dinov2,precision,recall', '--keep-features',
           '--inception-weights', assets['inception'], '--dinov2-weights', assets['dinov2']]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / 'two.pkl', 'rb') as f:
        two = pickle.load(f)
    # The ranks see different batches, so features differ by float32 rounding only (~1e-7 relative).
    for metric in ('fid', 'fd_dinov2'):
        scale = np.abs(one[metric]['mu']).max() + np.sqrt(np.abs(np.diag(one[metric]['sigma'])).max())
        assert np.allclose(two[metric]['mu'], one[metric]['mu'], rtol=0, atol=1e-5 * scale)
        assert np.allclose(two[metric]['sigma'], one[metric]['sigma'], rtol=0, atol=1e-5 * scale ** 2)
    for name in ('inception', 'dinov2'):
        a, b = one['features'][name], two['features'][name]
        assert np.allclose(a, b, rtol=0, atol=1e-5 * np.abs(a).max())


@pytest.mark.slow
def test_torchrun_unreadable_image_stops_every_rank(assets, tmp_path):
    # Only one rank meets the damaged file; the others must not wait for it forever.
    bad = tmp_path / 'bad'
    bad.mkdir()
    for name in sorted(os.listdir(assets['images']))[:5]:
        os.link(os.path.join(assets['images'], name), bad / name)
    (bad / '000099.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', f'--master_port={_free_port()}',
           os.path.join(REPO, 'calculate_metrics.py'), 'ref', '--data', str(bad), '--dest', str(tmp_path / 'r.pkl'),
           '--batch', '2', '--workers', '0', '--device', 'cpu', '--metrics', 'fid',
           '--inception-weights', assets['inception']]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS='1'), capture_output=True, text=True,
                          timeout=300, cwd=REPO)
    assert proc.returncode != 0
    assert 'Error: cannot read' in proc.stderr and '000099.png' in proc.stderr
    assert not (tmp_path / 'r.pkl').exists()  # (torchrun's own launcher prints a traceback on failure)
