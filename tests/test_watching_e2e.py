"""A watched training run end to end (slow): sample grids, metrics at a tracked and a reconstructed EMA length,
TensorBoard, a kill -9 and the resume; the metrics equal `calculate_metrics.py gen` run afterwards."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import calculate_metrics, reconstruct_phema
from edm2.metrics import detectors as det_lib

from helpers import REPO, make_shapes, net_args, subprocess_env, train_inprocess

pytestmark = pytest.mark.slow
STDS = (0.05, 0.15)        # --eval-stds: 0.05 tracked, 0.15 reconstructed
SEEDS, STEPS = 4, 4        # grid columns and Heun steps
EVAL_NUM, EVAL_STEPS = 6, 8


def _detectors(root):
    inc, dino = root / 'inception-tiny.pth', root / 'dinov2-tiny.pth'
    torch.save(det_lib.random_state_dict('inception', width_divisor=16), inc)
    torch.save(det_lib.random_state_dict('dinov2', embed_dim=32, depth=1, grid_size=4), dino)
    return ['--inception-weights', str(inc), '--dinov2-weights', str(dino)]


def _metrics_cli(args, weights):
    r = CliRunner().invoke(calculate_metrics.cli, [str(a) for a in args] + weights + ['--workers', '0'],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output


def _guide(path, kwargs):
    """A random network of the run's shapes, as the guide of the autoguided grid rows."""
    from edm2.checkpoint import save_network
    from edm2.encoders import StandardRGBEncoder
    from edm2.networks import build_network
    torch.manual_seed(5)
    save_network(path, build_network(kwargs).eval(), StandardRGBEncoder())
    return path


def _lines(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _key(line):
    return line['nimg'], line['ema_std'], line['metric']


def _raw_events(run):
    """(tag, step) of every scalar and image in the event files, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    pairs = []
    for path in sorted(run.glob('*tfevents*')):
        for record in RawEventFileLoader(str(path)).Load():
            event = Event.FromString(record)
            pairs += [(v.tag, event.step) for v in event.summary.value]
    return pairs


def test_watched_run_survives_kill9_and_matches_calculate_metrics(tmp_path, one_thread):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = make_shapes(tmp_path / 'shapes', n=48)
    weights = _detectors(tmp_path)
    ref = tmp_path / 'ref.pkl'
    _metrics_cli(['ref', '--data', data, '--dest', ref, '--metrics', 'fid,fd_dinov2', '--batch', 16], weights)
    kwargs = dict(img_resolution=8, img_channels=3, label_dim=3, model_channels=8, channel_mult=[1, 2], num_blocks=1,
                  attn_resolutions=[])
    guide = _guide(tmp_path / 'guide.safetensors', kwargs)
    run = tmp_path / 'run'
    args = ['--outdir', run, '--data', data, '--duration', 3000, '--batch', 16, '--status', 496, '--snapshot', 1000,
            '--checkpoint', 1000, '--snapshot-dtype', 'fp32', '--workers', 0, '--lr', 0.02, *net_args(),
            '--grid', 1000, '--grid-seeds', f'0-{SEEDS - 1}', '--grid-steps', STEPS, '--grid-gnet', guide,
            '--eval', 1000, '--eval-ref', ref, '--eval-metrics', 'fid,fd_dinov2', '--eval-num', EVAL_NUM,
            '--eval-steps', EVAL_STEPS,
            '--eval-batch', EVAL_NUM, '--eval-stds', ','.join(map(str, STDS)), '--logger', 'tensorboard', *weights]
    args = [str(a) for a in args]

    # 1. Killed with SIGKILL as soon as the second interval's grid is logged (its evaluation then runs), so
    #    that the event file holds steps after the checkpoint the run resumes from.
    p = subprocess.Popen([sys.executable, str(REPO / 'train_edm2.py'), *args], env=subprocess_env(),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while ('grid', 2) not in _raw_events(run) and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    out, _ = p.communicate(timeout=60)
    assert (run / 'grid-0000002.png').exists(), out[-3000:]
    killed = {_key(line): line for line in _lines(run / 'metrics.jsonl')}
    events_before = _raw_events(run)

    # 2. The same command finishes the run from the newest checkpoint.
    out = train_inprocess(*args)
    assert f'Resuming from {run / "training-state-0000001.pt"} at 1008 images' in out, out

    # Grids at the start and at every interval: rows = 2 tracked lengths x (plain, guided), SEEDS columns.
    times = [0, 1008, 2000, 3008]
    assert sorted(p.name for p in run.glob('grid-*.png')) == [f'grid-{t // 1000:07d}.png' for t in times]
    grid = np.asarray(PIL.Image.open(run / 'grid-0000001.png'))
    assert grid.shape == (4 * 8 + 3 * 2, SEEDS * 8 + (SEEDS - 1) * 2, 3)
    # Row 0 = the EMA 0.050 network of that time (its fp32 snapshot) sampled like generate_images.py.
    from edm2 import generation, sampling
    from edm2.checkpoint import load_snapshot
    net, encoder, _ = load_snapshot(run / 'network-snapshot-0000001-0.050.safetensors')
    classes = [i * 3 // SEEDS for i in range(SEEDS)]
    for i, c in enumerate(classes):
        image = next(iter(generation.generate(net, [i], classes=c, sigmas=sampling.edm_schedule(STEPS),
                                              encoder=encoder))).images[0].permute(1, 2, 0).numpy()
        cell = grid[0:8, i * 10:i * 10 + 8].astype(int)
        assert np.abs(cell - image.astype(int)).max() <= 1, i  # batch composition may change the last bit

    # metrics.jsonl: one line per (interval, length, metric); lines of finished intervals unchanged.
    lines = _lines(run / 'metrics.jsonl')
    keys = [_key(line) for line in lines]
    assert sorted(keys) == sorted((t, s, m) for t in times[1:] for s in STDS for m in ('fid', 'fd_dinov2'))
    assert [line['reconstructed'] for line in lines if line['nimg'] == 2000] == [False, False, True, True]
    final = {_key(line): line for line in lines}
    for key, line in killed.items():  # computed again after the resume when after the checkpoint: the same
        assert final[key]['value'] == line['value'], key
    assert len({line['value'] for line in lines}) > 6  # the values do differ between lengths and times

    # The same value as calculate_metrics.py gen afterwards, on the snapshot and on the reconstruction.
    rec_dir = tmp_path / 'rec'
    r = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(run), '--outdir', str(rec_dir), '--outstd', '0.15',
                                                    '--outkimg', '2', '--dtype', 'float32'], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    nets = {0.05: run / 'network-snapshot-0000002-0.050.safetensors', 0.15: next(rec_dir.iterdir())}
    for std, path in nets.items():
        _metrics_cli(['gen', '--net', path, '--ref', ref, '--metrics', 'fid,fd_dinov2', '--num', EVAL_NUM,
                      '--steps', EVAL_STEPS, '--batch', EVAL_NUM, '--out', tmp_path / f'gen-{std}.json'], weights)
        gen = json.loads((tmp_path / f'gen-{std}.json').read_text())['runs'][0]
        for metric in ('fid', 'fd_dinov2'):
            assert final[(2000, std, metric)]['value'] == pytest.approx(gen[metric], rel=1e-6, abs=0), (std, metric)

    # Per-σ loss buckets: the count-weighted mean of the bucket means is the mean loss of the line.
    for rec in _lines(run / 'stats.jsonl'):
        n = np.array(rec['loss_sigma_n'])
        means = np.array([m if m is not None else 0 for m in rec['loss_sigma']])
        assert (means * n).sum() / n.sum() == pytest.approx(rec['loss'], rel=1e-12)

    # TensorBoard's own readers: the tags, steps strictly increasing, the grids; no step logged twice.
    acc = EventAccumulator(str(run), size_guidance={'scalars': 0, 'images': 0})
    acc.Reload()
    tags = acc.Tags()
    metrics = {f'metrics/{m}/ema_{s:.3f}' for m in ('fid', 'fd_dinov2') for s in STDS}
    stats = {'loss', 'lr', 'grad_norm', 'sec_per_kimg', 'images_per_s', 'nonfinite', 'cpu_mem_gb', 'gpu_mem_gb',
             'watch_share'}
    assert tags['images'] == ['grid'] and metrics | stats <= set(tags['scalars'])
    assert all(t in metrics | stats or t.startswith('loss_sigma/') for t in tags['scalars'])  # empty buckets: none
    pairs = _raw_events(run)
    for tag in ('loss', 'lr', 'loss_sigma/-1<ln_sigma<=0', 'metrics/fid/ema_0.050', 'metrics/fd_dinov2/ema_0.150'):
        steps = [e.step for e in acc.Scalars(tag)]
        assert steps == sorted(set(steps)) and steps, (tag, steps)
    assert [e.step for e in acc.Scalars('metrics/fid/ema_0.150')] == [1, 2, 3], (events_before, pairs, out)
    assert [e.value for e in acc.Scalars('metrics/fid/ema_0.050')] == pytest.approx(
        [final[(t, 0.05, 'fid')]['value'] for t in times[1:]], rel=1e-6)
    assert [e.step for e in acc.Images('grid')] == [0, 1, 2, 3]
    assert len(pairs) == len(set(pairs)), [p for p in pairs if pairs.count(p) > 1][:5]
    assert len(events_before) > 0 and len(list(run.glob('*tfevents*'))) == 2  # one file per session


def test_two_processes_evaluate_like_one_calculate_metrics_gen(tmp_path, one_thread):
    """Under torchrun the images of an evaluation are split over the ranks (grid and logger on rank 0)."""
    data = make_shapes(tmp_path / 'shapes', n=24)
    weights = _detectors(tmp_path)
    ref = tmp_path / 'ref.pkl'
    _metrics_cli(['ref', '--data', data, '--dest', ref, '--metrics', 'fd_dinov2', '--batch', 8], weights)
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO / 'train_edm2.py'), '--outdir', str(run), '--data', str(data), '--duration', '1000', '--batch', '16',
           '--status', '1000', '--snapshot', '1000', '--checkpoint', '0', '--workers', '0', '--grid', '1000',
           '--grid-seeds', '0-2', '--grid-steps', '2', '--eval', '1000', '--eval-ref', str(ref),
           '--eval-metrics', 'fd_dinov2', '--eval-num', '5',
           '--eval-steps', '4', '--eval-batch', '2', '--eval-stds', '0.05,0.15', *[str(a) for a in net_args()],
           *weights]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = _lines(run / 'metrics.jsonl')
    assert [(line['ema_std'], line['reconstructed']) for line in lines] == [(0.05, False), (0.15, True)]
    assert sorted(p.name for p in run.glob('grid-*.png')) == ['grid-0000000.png', 'grid-0000001.png']
    _metrics_cli(['gen', '--net', run / 'network-snapshot-0000001-0.050.safetensors', '--ref', ref,
                  '--metrics', 'fd_dinov2', '--num', 5, '--steps', 4, '--batch', 2, '--out', tmp_path / 'gen.json'], weights)
    gen = json.loads((tmp_path / 'gen.json').read_text())['runs'][0]['fd_dinov2']
    assert lines[0]['value'] == pytest.approx(gen, rel=1e-6)  # the same images, split over the ranks the same way
