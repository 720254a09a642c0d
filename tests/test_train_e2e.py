"""End-to-end training runs (slow): exact resume after SIGTERM and kill -9, DDP and accumulation
equivalence, and learning on a synthetic coloured-shapes dataset."""

import json
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import REPO, make_shapes, net_args, subprocess_env, train_inprocess
import torch


pytestmark = pytest.mark.slow
@pytest.fixture
def one_thread():
    """Runs compared bit for bit must use the same thread count (CPU reductions depend on it)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def load_state(run):
    files = sorted(pathlib.Path(run).glob('training-state-*.pt'))
    return torch.load(files[-1], weights_only=True)


def test_exact_resume_after_sigterm_and_kill9(tmp_path, one_thread):
    data = make_shapes(tmp_path / 'shapes', n=24)
    # Checkpoint every step (the kill -9 is then likely to land during a write); dropout exercises the RNG.
    args = ['--data', data, '--duration', 160, '--batch', 8, '--dropout', 0.1, '--lr', 0.02, '--status', 32,
            '--snapshot', 0, '--checkpoint', 8, '--workers', 1, *net_args()]
    ref = tmp_path / 'uninterrupted'
    train_inprocess('--outdir', ref, *args)

    run = tmp_path / 'interrupted'
    cmd = [sys.executable, str(REPO / 'train_edm2.py'), '--outdir', str(run), *[str(a) for a in args]]
    ckpt = run / 'training-state-0000000.pt'

    # 1. SIGTERM after the first checkpoint: the step finishes, a checkpoint is written, exit code 0.
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and 'Stopped by SIGTERM' in out and 'Traceback' not in out, out
    first = torch.load(ckpt, weights_only=True)['cur_nimg']
    assert 8 <= first < 160

    # 2. Resume with the same command, then kill -9 at a random moment after it has moved on.
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mtime = ckpt.stat().st_mtime_ns
    deadline = time.time() + 120
    while ckpt.stat().st_mtime_ns == mtime and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(0).uniform(0, 0.05))  # a step takes longer even on a fast machine
    p.kill()
    out, _ = p.communicate(timeout=60)
    assert f'Resuming from {ckpt}' in out, out
    state = torch.load(ckpt, weights_only=True)  # the newest checkpoint is never torn
    assert first < state['cur_nimg'] <= 160

    # 3. The same command once more finishes the run: identical to the uninterrupted one, bit for bit.
    out = train_inprocess('--outdir', run, *args)
    assert 'Resuming from' in out
    a, b = load_state(ref), load_state(run)
    assert a['cur_nimg'] == b['cur_nimg'] == 160
    for key in a['net']:
        assert torch.equal(a['net'][key], b['net'][key]), key
    for ema_a, ema_b in zip(a['ema']['emas'], b['ema']['emas']):
        for key in ema_a:
            assert torch.equal(ema_a[key], ema_b[key]), key
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    snaps = sorted(p.name for p in ref.glob('network-snapshot-*'))
    assert snaps == sorted(p.name for p in run.glob('network-snapshot-*')) and len(snaps) == 2
    for name in snaps:
        assert (ref / name).read_bytes() == (run / name).read_bytes(), name
    assert not [p.name for p in run.iterdir() if p.name.endswith('.tmp')]  # stale temporaries cleaned up
    stats = [json.loads(line)['nimg'] for line in (run / 'stats.jsonl').read_text().splitlines()]
    assert stats == sorted(set(stats)) and stats[-1] == 160  # no duplicated status after resuming


def _param_distance(sd_a, sd_b):
    return float(sum(((sd_a[k].double() - sd_b[k].double()) ** 2).sum() for k in sd_a) ** 0.5)


def test_ddp_and_accumulation_match_one_process(tmp_path, one_thread):
    data = make_shapes(tmp_path / 'shapes', n=48)
    lr, steps, B = 0.02, 3, 16
    args = ['--data', data, '--duration', steps * B, '--batch', B, '--lr', lr, '--status', B,
            '--snapshot', 0, '--checkpoint', 0, '--workers', 0, *net_args(16)]
    train_inprocess('--outdir', tmp_path / 'one', *args)
    train_inprocess('--outdir', tmp_path / 'accum', *args, '--batch-gpu', 4)  # 4 accumulation rounds
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO / 'train_edm2.py'), '--outdir', str(tmp_path / 'ddp'), *[str(a) for a in args]]
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert '2 process(es) on cpu, batch 16 = 2 x 8 x 1' in r.stdout + r.stderr

    one = load_state(tmp_path / 'one')
    n = sum(v.numel() for v in one['net'].values())
    # One Adam step moves every weight by about lr, i.e. the whole vector by about lr*sqrt(n). Float32
    # summation order (per-rank partial sums, accumulation rounds) perturbs gradients by ~1e-7
    # relative; allow 1e-3 of a single step for the few elements whose gradient is near Adam's eps.
    tol = 1e-3 * lr * n ** 0.5
    for other in ('accum', 'ddp'):
        st = load_state(tmp_path / other)
        assert st['cur_nimg'] == one['cur_nimg'] == steps * B
        assert _param_distance(one['net'], st['net']) < tol, other
        for ea, eb in zip(one['ema']['emas'], st['ema']['emas']):
            assert _param_distance(ea, eb) < tol, other
        loss_a = [json.loads(x)['loss'] for x in (tmp_path / 'one' / 'stats.jsonl').read_text().splitlines()]
        loss_b = [json.loads(x)['loss'] for x in (tmp_path / other / 'stats.jsonl').read_text().splitlines()]
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-4)  # the same images and noise in every step


def test_learns_coloured_shapes(tmp_path, one_thread):
    from edm2.checkpoint import load_network
    from edm2.networks import build_network
    from edm2.data import ImageFolderDataset
    from edm2.sampling import edm_schedule, heun_sampler

    data = make_shapes(tmp_path / 'shapes')
    run = tmp_path / 'run'
    steps, B = 200, 16
    train_inprocess('--outdir', run, '--data', data, '--duration', steps * B, '--batch', B, '--lr', 0.02,
                    '--status', 25 * B, '--snapshot', 0, '--checkpoint', 0, '--workers', 0, '--P_mean', -0.8,
                    '--P_std', 1.6, *net_args(16))
    losses = [json.loads(x)['loss'] for x in (run / 'stats.jsonl').read_text().splitlines()]
    assert len(losses) == steps // 25
    assert losses[-1] < losses[0] - 0.8, losses  # the loss is a log-scale quantity: e^0.8 ~ 2.2x lower error

    ds = ImageFolderDataset(data, use_labels=True)
    real = torch.from_numpy(np.stack([ds[i][0] for i in range(len(ds.names))])).float() / 127.5 - 1
    labels = torch.from_numpy(ds.labels)
    trained = load_network(next(run.glob('network-snapshot-*-0.100.safetensors')))
    torch.manual_seed(0)  # the training run's initial network (built from --seed 0)
    initial = build_network(json.loads((run / 'training_options.json').read_text())['network_kwargs']).eval()

    def distances(net):
        gen = torch.Generator().manual_seed(1)
        mean_err, nn_dist = [], []
        for c in range(3):
            noise = torch.randn(16, 3, 8, 8, generator=gen)
            with torch.no_grad():
                x = heun_sampler(net, noise, edm_schedule(12), torch.eye(3)[[c] * 16]).clamp(-1, 1)
            ref = real[labels == c]
            mean_err.append(float(((x.mean(0) - ref.mean(0)) ** 2).mean()))  # class-mean image error
            nn_dist.append(float(((x[:, None] - ref[None]) ** 2).flatten(2).mean(2).min(1).values.mean()))
        return np.mean(mean_err), np.mean(nn_dist)

    trained_mean, trained_nn = distances(trained)
    initial_mean, initial_nn = distances(initial)
    assert trained_mean < 0.25 * initial_mean, (trained_mean, initial_mean)
    assert trained_nn < 0.5 * initial_nn, (trained_nn, initial_nn)


def test_sigterm_to_torchrun_saves_a_checkpoint(tmp_path):
    """torchrun forwards SIGTERM to each rank's process group (DataLoader workers included): the ranks
    agree on the step and rank 0 writes a checkpoint of exactly that step."""
    data = make_shapes(tmp_path / 'shapes', n=24)
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO / 'train_edm2.py'), '--outdir', str(run), '--data', str(data), '--duration', '1Mi',
           '--batch', '8', '--status', '64', '--checkpoint', '64', '--workers', '1', *[str(a) for a in net_args()]]
    p = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    ckpt = run / 'training-state-0000000.pt'
    deadline = time.time() + 180
    while not ckpt.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    log = (run / 'log.txt').read_text()
    assert 'Stopped by SIGTERM' in log, out[-3000:]
    assert 'killed by signal' not in out  # DataLoader workers survived until the checkpoint was written
    stopped_at = int(log.split('Stopped by SIGTERM at ')[1].split()[0])
    assert torch.load(ckpt, weights_only=True)['cur_nimg'] == stopped_at
