"""Hostile but realistic input to train_edm2.py: bad numbers, damaged images, crashed or edited run
directories, colliding snapshot names, killed runs' temporaries, a loss that turns non-finite.

Every refusal is one line naming the flag or file, with a non-zero exit status, no traceback, nothing
under a final name, and no process left behind (DataLoader workers included)."""

import json
import os
import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import PIL.Image
import psutil
import pytest
import torch
from click.testing import CliRunner
from helpers import make_images

from edm2.commands import train_edm2
from edm2 import fileio
from edm2.training.loss import EDM2Loss

REPO = pathlib.Path(__file__).resolve().parent.parent
TINY = ['--channels', '8', '--channel-mult', '1,2', '--num-blocks', '1', '--attn-res', '', '--device', 'cpu',
        '--rampup', '0', '--cond', '0']
FINAL_OUTPUTS = ('network-snapshot-*', 'training-state-*', 'training_options.json')


def invoke(*args):
    """In-process run: (exit code, output). Unhandled exceptions fail the test (catch_exceptions=False)."""
    r = CliRunner().invoke(train_edm2.main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.output


def subprocess_env():
    return dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONPATH=str(REPO))


def run_subprocess(cmd, timeout):
    """(exit code, output, seconds) of a command in its own session; fails if it outlives `timeout`."""
    start = time.time()
    p = subprocess.Popen([str(c) for c in cmd], env=subprocess_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, 9)
        out, _ = p.communicate()
        pytest.fail(f'still running after {timeout} s (hang):\n{out[-3000:]}')
    return p.returncode, out, time.time() - start


def assert_one_line_error(code, out, *names, torchrun=False):
    """Non-zero exit, one 'Error: ' line naming `names`, no traceback (torchrun prints its own report
    of a failed rank, with a traceback of torchrun itself: then no frame of this project may appear)."""
    assert code not in (0, None), out
    errors = [line for line in out.replace('\r', '\n').splitlines() if re.search(r'(?<![A-Za-z])Error: ', line)]
    errors = [line for line in errors if not torchrun or 'ChildFailedError' not in line]
    assert len(errors) == 1, out
    assert all(name in errors[0] for name in names), (names, errors[0])
    if torchrun:
        assert not re.search(r'File ".*(train_edm2\.py|training/|edm2/)', out), out
    else:
        assert 'Traceback' not in out, out


def assert_no_final_outputs(run):
    found = [p.name for pattern in FINAL_OUTPUTS for p in pathlib.Path(run).glob(pattern)]
    assert not found, found


def assert_no_process_left(marker, wait=10):
    """No process whose command line mentions `marker` (the run directory) survives."""
    deadline = time.time() + wait
    while True:
        left = []
        for p in psutil.process_iter(['pid', 'cmdline']):
            with_marker = any(marker in part for part in (p.info['cmdline'] or []))
            if with_marker and p.pid != os.getpid():
                left.append(p.pid)
        if not left or time.time() > deadline:
            break
        time.sleep(0.2)
    assert not left, f'processes left: {left}'


# ----------------------------------------------------------------------------------------------
# 1. Numbers: refused before any work, with the flag named.

BAD_NUMBERS = [
    (['--lr', 'inf'], '--lr'), (['--lr', 'nan'], '--lr'), (['--lr', '-0.01'], '--lr'), (['--lr', '0'], '--lr'),
    (['--lr', '1e30'], '--lr'), (['--decay', 'nan'], '--decay'), (['--decay', '-5'], '--decay'),
    (['--decay', '1e300'], '--decay'), (['--dropout', '1'], '--dropout'), (['--dropout', 'nan'], '--dropout'),
    (['--P_mean', 'inf'], '--P_mean'), (['--P_mean', '1e9'], '--P_mean'), (['--P_std', '0'], '--P_std'),
    (['--P_std', '-1'], '--P_std'), (['--ls', '0'], '--ls'), (['--ls', 'inf'], '--ls'),
    (['--channels', '-8'], '--channels'), (['--channels', '0'], '--channels'),
    (['--channels', '10000000'], '--channels'), (['--channels', '8.5'], '--channels'),
    (['--num-blocks', '0'], '--num-blocks'), (['--num-blocks', '100000'], '--num-blocks'),
    (['--channel-mult', '1,-2'], '--channel-mult'), (['--channel-mult', '1,2.5'], '--channel-mult'),
    (['--channel-mult', 'nan'], '--channel-mult'), (['--channel-mult', ','.join(['1'] * 17)], '--channel-mult'),
    (['--attn-res', '-8'], '--attn-res'), (['--batch', '0'], '--batch'), (['--batch', '-4'], '--batch'),
    (['--batch', '99999999999'], '--batch'), (['--batch', '1e3'], '--batch'), (['--batch-gpu', '0'], '--batch-gpu'),
    (['--duration', '0'], '--duration'), (['--duration', '99999999999Gi'], '--duration'),
    (['--duration', 'nan'], '--duration'), (['--status', '-1'], '--status'), (['--snapshot', '1.5'], '--snapshot'),
    (['--checkpoint', 'inf'], '--checkpoint'), (['--rampup', '-10M'], '--rampup'),
    (['--workers', '-1'], '--workers'), (['--workers', '100000'], '--workers'), (['--seed', '-1'], '--seed'),
    (['--seed', str(1 << 64)], '--seed'), (['--ema-stds', 'nan'], '--ema-stds'), (['--ema-stds', '0.3'], '--ema-stds'),
    (['--ema-stds', '0,0.1'], '--ema-stds'), (['--ema-stds', '0.05,0.05'], '--ema-stds'),
    (['--ema-stds', '0.0501,0.0504'], '--ema-stds'),
]


@pytest.mark.parametrize('bad,flag', BAD_NUMBERS, ids=[' '.join(b) for b, _ in BAD_NUMBERS])
def test_bad_numbers_are_refused_before_any_work(tmp_path, bad, flag):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    defaults = {'--duration': '64', '--batch': '4', '--workers': '0'}
    given = dict(zip(bad[::2], bad[1::2]))
    extra = [x for k, v in defaults.items() if k not in given for x in (k, v)]
    code, out = invoke('--outdir', run, '--data', data, *TINY, *extra, *bad)
    assert_one_line_error(code, out, flag)
    assert not run.exists()


@pytest.mark.parametrize('flag', ['--outdir', '--data'])
def test_empty_paths_are_refused(tmp_path, monkeypatch, flag):
    monkeypatch.chdir(make_images(tmp_path / 'data'))  # an empty --data must not mean "the current folder"
    args = {'--outdir': str(tmp_path / 'run'), '--data': str(tmp_path / 'data'), flag: ''}
    code, out = invoke(*[x for kv in args.items() for x in kv], *TINY, '--duration', 8, '--batch', 4)
    assert_one_line_error(code, out, flag, 'empty')
    assert not (tmp_path / 'run').exists() and sorted(os.listdir(tmp_path)) == ['data']


def test_outdir_that_is_or_lies_under_a_file_is_refused(tmp_path):
    data = make_images(tmp_path / 'data')
    (tmp_path / 'file').write_text('precious')
    for outdir in (tmp_path / 'file', tmp_path / 'file' / 'run', tmp_path / 'file' / 'a' / 'b'):
        code, out = invoke('--outdir', outdir, '--data', data, *TINY, '--duration', 8, '--batch', 4)
        assert_one_line_error(code, out, '--outdir', 'not a folder' if outdir.name == 'file' else 'is a file')
        assert (tmp_path / 'file').read_text() == 'precious'


def test_enormous_network_is_refused_without_allocating(tmp_path):
    data = make_images(tmp_path / 'data', res=64)
    run = tmp_path / 'run'
    rss = psutil.Process().memory_info().rss
    start = time.time()
    code, out = invoke('--outdir', run, '--data', data, '--duration', 64, '--batch', 4, '--channels', 4096,
                       '--channel-mult', '1,2,3,4,5,6', '--num-blocks', 8, '--device', 'cpu', '--cond', 0)
    assert_one_line_error(code, out, '--channels', 'parameters')
    assert time.time() - start < 60 and psutil.Process().memory_info().rss - rss < 1 << 30
    assert not run.exists()


def test_a_preset_value_out_of_range_is_refused(tmp_path, monkeypatch):
    from edm2 import presets
    data = make_images(tmp_path / 'data')
    real = presets.get
    monkeypatch.setattr(presets, 'get', lambda name, key: dict(real(name, key), lr=float('nan')))
    code, out = invoke('--outdir', tmp_path / 'run', '--data', data, '--preset', 'edm2-img64-xs', *TINY)
    assert_one_line_error(code, out, '--lr', 'finite')
    assert not (tmp_path / 'run').exists()


# ----------------------------------------------------------------------------------------------
# 2. Snapshot names cannot collide (kimg = images // 1000 names the file).

@pytest.mark.parametrize('args,pair', [
    (['--snapshot', 512, '--duration', 2048, '--batch', 256], (1024, 1536)),       # the example
    (['--snapshot', 1000, '--duration', 1500, '--batch', 100], (1000, 1500)),      # last interval vs the end
    (['--snapshot', 300, '--duration', 900, '--batch', 4], (300, 600)),            # a small run
    (['--snapshot', 2000, '--duration', 2500, '--batch', 500], (2000, 2500)),      # a large interval, odd duration
])
def test_colliding_snapshot_names_are_refused(tmp_path, args, pair):
    data = make_images(tmp_path / 'data')
    code, out = invoke('--outdir', tmp_path / 'run', '--data', data, *TINY, '--workers', 0, *args)
    assert_one_line_error(code, out, '--snapshot', f'at {pair[0]} and {pair[1]} images')
    assert not (tmp_path / 'run').exists()


def test_snapshot_intervals_that_cannot_collide_are_accepted(tmp_path):
    data = make_images(tmp_path / 'data')
    for args in (['--snapshot', 1000, '--duration', 3000, '--batch', 100], ['--snapshot', 0, '--duration', 512,
                 '--batch', 4], ['--snapshot', 4, '--duration', 16000, '--batch', 2000]):
        code, out = invoke('--outdir', tmp_path / 'run', '--data', data, *TINY, '--workers', 0, *args, '-n')
        assert code == 0, (args, out)


@pytest.mark.slow
def test_snapshot_collision_with_an_earlier_session_is_refused_on_resume(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    base = ['--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 100, '--checkpoint', 0]
    code, out = invoke(*base, '--duration', 1500, '--snapshot', 0)  # end snapshot at 1500 images: kimg 1
    assert code == 0, out
    before = sorted(p.name for p in run.iterdir())
    code, out = invoke(*base, '--duration', 4000, '--snapshot', 1800)  # next at 1800: kimg 1 again
    assert_one_line_error(code, out, '--snapshot', 'at 1500 and 1800 images')
    assert sorted(p.name for p in run.iterdir()) == before
    code, out = invoke(*base, '--duration', 4000, '--snapshot', 2000)  # 2000, 4000: fine
    assert code == 0 and 'Resuming from' in out, out
    assert len(list(run.glob('network-snapshot-*-0.100.safetensors'))) == 3


# ----------------------------------------------------------------------------------------------
# 3. Settings are recorded after the first successful step; resume compares resolved settings.

@pytest.mark.slow
def test_explicit_default_network_flags_resume_the_run(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    base = ['--outdir', run, '--data', data, '--channels', 8, '--num-blocks', 1, '--attn-res', '', '--rampup', 0,
            '--device', 'cpu', '--cond', 0, '--workers', 0, '--batch', 500, '--snapshot', 0]
    code, out = invoke(*base, '--duration', 1000)  # --channel-mult omitted: 1,2,3,4 from configs/networks.toml
    assert code == 0, out
    code, out = invoke(*base, '--duration', 2000, '--channel-mult', '1,2,3,4', '--fp16', 1, '--data',
                       os.path.relpath(data))
    assert code == 0 and 'Resuming from' in out, out
    code, out = invoke(*base, '--duration', 3000, '--channel-mult', '1,2,3')  # a real change is still refused
    assert_one_line_error(code, out, 'channel_mult: [1, 2, 3, 4] -> [1, 2, 3]')


@pytest.mark.slow
def test_missing_or_damaged_options_file_resumes_from_the_checkpoint(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    base = ['--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 500, '--snapshot', 0]
    assert invoke(*base, '--duration', 1000)[0] == 0
    recorded = (run / 'training_options.json').read_text()
    (run / 'training_options.json').unlink()
    code, out = invoke(*base, '--duration', 2000)
    assert code == 0 and 'training_options.json is missing: resuming from' in out, out
    assert json.loads((run / 'training_options.json').read_text()) == json.loads(recorded)
    (run / 'training_options.json').write_text('{"lr": ')
    code, out = invoke(*base, '--duration', 3000)
    assert code == 0 and 'is unreadable' in out and 'resuming from' in out, out
    code, out = invoke(*base, '--duration', 4000, '--lr', '0.02')  # the checkpoint still guards the settings
    assert_one_line_error(code, out, 'training-state-0000003.pt', 'lr: 0.01 -> 0.02')


def test_options_file_of_a_crashed_start_does_not_lock_the_run(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    run.mkdir()
    # What an earlier version wrote before validating `--lr nan`, then crashed: no checkpoint, no snapshot.
    (run / 'training_options.json').write_text(json.dumps({'lr': float('nan'), 'batch': 4, 'data': str(data)}))
    code, out = invoke('--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 4, '--duration', 8)
    assert code == 0 and 'Starting from the beginning' in out and 'replaced' in out, out
    assert json.loads((run / 'training_options.json').read_text())['lr'] == 0.01


def test_a_start_that_fails_at_its_first_step_records_nothing(tmp_path):
    data = make_images(tmp_path / 'data')
    (data / '001.png').write_bytes((data / '000.png').read_bytes()[:60])
    run = tmp_path / 'run'
    base = ['--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 8, '--duration', 16]
    code, out = invoke(*base, '--lr', '0.05')
    assert_one_line_error(code, out, '001.png', 'truncated')
    assert_no_final_outputs(run)
    assert 'Error: --data' in (run / 'log.txt').read_text()
    make_images(data)  # repaired; the corrected command (another --lr) is not refused
    code, out = invoke(*base, '--lr', '0.02')
    assert code == 0 and json.loads((run / 'training_options.json').read_text())['lr'] == 0.02, out


def test_snapshots_of_other_settings_without_checkpoint_are_protected(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    base = ['--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 4, '--duration', 8]
    assert invoke(*base)[0] == 0
    for p in run.glob('training-state-*'):
        p.unlink()  # as if killed after its snapshots but before its first checkpoint
    code, out = invoke(*base, '--lr', '0.02')
    assert_one_line_error(code, out, '--outdir', 'snapshots', 'lr: 0.01 -> 0.02')
    code, out = invoke(*base)  # the same settings restart from the beginning
    assert code == 0 and 'Starting from the beginning' in out, out


# ----------------------------------------------------------------------------------------------
# 4. Temporaries of a killed run are removed; those of a live process are not.

def test_stale_temporaries_are_removed_on_the_next_run(tmp_path):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    run.mkdir()
    dead = subprocess.Popen([sys.executable, '-c', 'pass'])
    dead.wait()
    stale = []
    for name in ('training-state-0000000.pt', 'network-snapshot-0000000-0.100.safetensors', 'stats.jsonl'):
        tmp = fileio.temporary_name(run / name)
        tmp = tmp.with_name(tmp.name.replace(f'-{os.getpid()}-', f'-{dead.pid}-'))
        tmp.write_bytes(b'x' * 1000)
        stale.append(tmp)
    live = fileio.temporary_name(run / 'training-state-0000001.pt')  # this (live) process's
    live.write_bytes(b'y')
    code, out = invoke('--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 4, '--duration', 8)
    assert code == 0, out
    assert not any(p.exists() for p in stale) and live.exists()
    assert not [p.name for p in run.iterdir() if p.name.endswith('.tmp') and p != live]


# ----------------------------------------------------------------------------------------------
# 5. A non-finite loss stops the run without writing the damaged state.

def test_nonfinite_loss_stops_without_writing_snapshots(tmp_path, monkeypatch):
    data = make_images(tmp_path / 'data')
    run = tmp_path / 'run'
    calls = []
    real = EDM2Loss.__call__

    def poisoned(self, *args, **kwargs):
        calls.append(1)
        loss = real(self, *args, **kwargs)
        return loss * float('nan') if len(calls) == 6 else loss

    monkeypatch.setattr(EDM2Loss, '__call__', poisoned)
    code, out = invoke('--outdir', run, '--data', data, *TINY, '--workers', 0, '--batch', 4, '--duration', 64,
                       '--status', 16, '--checkpoint', 16, '--snapshot', 0)
    assert_one_line_error(code, out, 'non-finite', 'between 16 and 32 images')
    assert [p.name for p in run.glob('training-state-*')] == ['training-state-0000000.pt']
    assert torch.load(run / 'training-state-0000000.pt', weights_only=True)['cur_nimg'] == 16
    assert not list(run.glob('network-snapshot-*'))


def test_nonfinite_latents_stop_the_run(tmp_path):
    lat = tmp_path / 'lat'
    lat.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(4):
        arr = np.concatenate([rnd.randn(4, 8, 8), np.full((4, 8, 8), 0.1)]).astype(np.float32)
        if i == 2:
            arr[0, 3, 3] = np.nan
        np.save(lat / f'img-mean-std-{i:08d}.npy', arr)
    run = tmp_path / 'run'
    code, out = invoke('--outdir', run, '--data', lat, *TINY, '--workers', 0, '--batch', 4, '--duration', 16)
    # The dataset reader refuses the file itself, naming it, before a NaN can reach the loss.
    assert_one_line_error(code, out, 'img-mean-std-00000002.npy', 'NaN or infinite')
    assert_no_final_outputs(run)


def test_unexpected_error_mid_run_is_one_line_and_stops_the_workers(tmp_path, monkeypatch):
    from edm2.phema import PowerFunctionEMA
    data = make_images(tmp_path / 'data', n=32)
    run = tmp_path / 'run'
    calls = []
    real = PowerFunctionEMA.update

    def broken(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError('simulated failure inside the loop')
        return real(self, *args, **kwargs)

    monkeypatch.setattr(PowerFunctionEMA, 'update', broken)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    code, out = invoke('--outdir', run, '--data', data, *TINY, '--workers', 2, '--batch', 4, '--duration', 64,
                       '--snapshot', 0)
    assert_one_line_error(code, out, 'training stopped at 12 images', 'RuntimeError: simulated failure', 'log.txt')
    log = (run / 'log.txt').read_text()
    assert 'Traceback' in log and 'in broken' in log
    assert {p.pid for p in psutil.Process().children(recursive=True)} - before == set()
    assert not list(run.glob('training-state-*')) and not list(run.glob('network-snapshot-*'))


# ----------------------------------------------------------------------------------------------
# 6. A damaged image mid-epoch with DataLoader workers: the run ends in seconds, one line, no process left.

def _bad_image_dataset(root, damage):
    data = make_images(root, n=32)
    good = (data / '000.png').read_bytes()
    target = data / '017.png'
    if damage == 'truncated':
        target.write_bytes(good[:60])
    elif damage == 'empty':
        target.write_bytes(b'')
    elif damage == 'not-an-image':
        target.write_text('<html>404 Not Found</html>')
    elif damage == 'other-size':
        PIL.Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(target)
    return data


def _bad_image_args(data, run):
    return ['--outdir', run, '--data', data, *TINY, '--batch', 4, '--duration', 1024, '--status', 4,
            '--snapshot', 0, '--checkpoint', 0]


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncated', 'empty', 'not-an-image', 'other-size'])
def test_bad_image_with_workers_ends_the_run(tmp_path, damage):
    data = _bad_image_dataset(tmp_path / 'data', damage)
    run = tmp_path / 'run'
    cmd = [sys.executable, REPO / 'train_edm2.py', *_bad_image_args(data, run), '--workers', 2]
    code, out, seconds = run_subprocess(cmd, timeout=120)
    assert_one_line_error(code, out, '017.png')
    assert code == 1 and seconds < 60, seconds
    assert 'kimg 0.008' in out  # it failed mid-epoch, after successful steps
    assert not list(run.glob('training-state-*')) and not list(run.glob('network-snapshot-*'))
    assert_no_process_left(str(run))


@pytest.mark.slow
def test_bad_image_under_torchrun_ends_the_run(tmp_path):
    data = _bad_image_dataset(tmp_path / 'data', 'truncated')
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           REPO / 'train_edm2.py', *_bad_image_args(data, run), '--workers', 2]
    code, out, seconds = run_subprocess(cmd, timeout=180)
    assert_one_line_error(code, out, '017.png', 'truncated', torchrun=True)
    assert seconds < 90, seconds
    assert not list(run.glob('training-state-*')) and not list(run.glob('network-snapshot-*'))
    assert_no_process_left(str(run))


@pytest.mark.slow
@pytest.mark.parametrize('damaged', [[17], list(range(1, 32))], ids=['one rank, mid-run', 'both ranks, first step'])
def test_every_rank_that_meets_a_damaged_image_prints_its_own_line(tmp_path, damaged):
    """A 2-process torchrun (gloo) job: each rank that reads a damaged image prints its own one-line error naming
    its file, on a line of its own (not after rank 0's progress bar, whose next redraw would erase it on a
    terminal), before the process group is shut down; no process is left."""
    data = make_images(tmp_path / 'data', n=32)
    good = (data / '000.png').read_bytes()
    for i in damaged:
        (data / f'{i:03d}.png').write_bytes(good[:60])
    run = tmp_path / 'run'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           REPO / 'train_edm2.py', *_bad_image_args(data, run), '--workers', 0]
    code, out, seconds = run_subprocess(cmd, timeout=180)
    assert code not in (0, None), out
    lines = out.replace('\r', '\n').splitlines()
    errors = [line for line in lines if line.startswith('Error: ')]
    named = {m for line in errors for m in re.findall(r'\d{3}\.png', line)}
    expected = 1 if len(damaged) == 1 else 2
    assert len(errors) == expected and len(named) == expected and all('truncated' in e for e in errors), out
    assert not [line for line in lines if 'Error: --data' in line and not line.startswith('Error: ')], out
    assert not re.search(r'File ".*(train_edm2\.py|training/|edm2/)', out), out
    assert_no_process_left(str(run))
