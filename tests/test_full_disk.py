"""A full disk (ENOSPC) in every writing command: one line naming the file and "no space left", the
partial temporary removed, finished outputs intact, and a rerun that resumes.

The disk is made full by a patched `open` (builtins and io): files whose name contains a given text
accept `budget` bytes, then every write fails with ENOSPC, as a file system that ran out of space does.
"""

import builtins
import errno
import io
import json
import os

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from edm2.commands import calculate_metrics
from edm2.commands import dataset_tool
from edm2.commands import generate_images
from edm2.commands import reconstruct_phema
from edm2.commands import train_edm2
from edm2.checkpoint import load_network
from helpers import sweep_args, write_snapshots

pytestmark = pytest.mark.usefixtures('one_thread')



class _Limited:
    """A file object that takes `state['budget']` more bytes, then fails every write with ENOSPC."""

    def __init__(self, f, state):
        self._f, self._state = f, state

    def write(self, data):
        room = self._state['budget']
        if len(data) > room:
            if room > 0:
                self._f.write(data[:room])  # a partial write, as the last blocks of a disk are filled
            self._state['budget'] = 0
            self._state['failed'] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._state['budget'] -= len(data)
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk(monkeypatch, text, budget=0, skip=0):
    """Writes to files whose name contains `text` fail once `budget` bytes went to them, after `skip`
    such files were written in full. Returns the state (`failed`: writes refused)."""
    real = builtins.open
    state = dict(budget=budget, failed=0, skip=skip)

    def fake_open(file, mode='r', *args, **kwargs):
        f = real(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in 'wax+') and \
                text in os.path.basename(os.fspath(file)):
            if state['skip'] > 0:
                state['skip'] -= 1
                return f
            return _Limited(f, state)
        return f

    monkeypatch.setattr(builtins, 'open', fake_open)
    monkeypatch.setattr(io, 'open', fake_open)
    return state


def _one_line_no_space(result, name):
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.output.splitlines() if line.startswith('Error:')]
    assert len(errors) == 1 and name in errors[0] and 'no space left' in errors[0], result.output
    assert 'Traceback' not in result.output


def _no_temporaries(folder):
    left = [p for p in os.listdir(folder) if p.endswith('.tmp') or p.startswith('.')]
    assert not left, left


def _invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args])


@pytest.mark.slow
def test_generate(tmp_path, monkeypatch):
    net = write_snapshots(tmp_path / 'run') / 'network-snapshot-0000016-0.100.safetensors'
    out = tmp_path / 'out'
    args = ['--net', net, '--seeds', '0-3', '--batch', 1, '--steps', 2, '--device', 'cpu', '--outdir', out]
    state = fill_disk(monkeypatch, '000002.png', budget=100)
    _one_line_no_space(_invoke(generate_images.main, *args), '000002.png')
    assert state['failed'] == 1
    assert sorted(os.listdir(out)) == ['000000.png', '000001.png']  # finished images intact, nothing partial
    first = (out / '000000.png').read_bytes()
    monkeypatch.undo()
    result = _invoke(generate_images.main, *args, '--skip-existing')  # resumes
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == [f'00000{i}.png' for i in range(4)]
    assert (out / '000000.png').read_bytes() == first
    for i in range(4):
        assert np.asarray(PIL.Image.open(out / f'00000{i}.png')).shape == (8, 8, 3)


def test_reconstruct_phema(tmp_path, monkeypatch):
    run = write_snapshots(tmp_path / 'run')
    out = tmp_path / 'out'
    args = ['--indir', run, '--outdir', out, '--outstd', '0.07,0.09', '--batch', 1, '--device', 'cpu']
    fill_disk(monkeypatch, 'phema-0000016-0.090', budget=1000)
    _one_line_no_space(_invoke(reconstruct_phema.main, *args), f'{out}/phema-0000016-0.090.safetensors')
    assert os.listdir(out) == ['phema-0000016-0.070.safetensors']
    load_network(out / 'phema-0000016-0.070.safetensors')
    monkeypatch.undo()
    result = _invoke(reconstruct_phema.main, *args, '--skip')
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == ['phema-0000016-0.070.safetensors', 'phema-0000016-0.090.safetensors']


@pytest.mark.parametrize('dest', ['data.zip', 'data'])
def test_dataset_tool(tmp_path, monkeypatch, dest):
    src = tmp_path / 'src'
    src.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(6):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f'{i}.png')
    text = dest if dest.endswith('.zip') else 'img00000003'
    fill_disk(monkeypatch, text, budget=1200 if dest.endswith('.zip') else 100)
    _one_line_no_space(_invoke(dataset_tool.cli, 'convert', '--source', src, '--dest', tmp_path / dest),
                       str(tmp_path / dest))
    assert sorted(os.listdir(tmp_path)) == ['src']  # the partial output is gone
    monkeypatch.undo()
    result = _invoke(dataset_tool.cli, 'convert', '--source', src, '--dest', tmp_path / dest)
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_sweep(sweep_assets, tmp_path, monkeypatch):
    out = tmp_path / 'sweep'
    fill_disk(monkeypatch, 'cells.jsonl', skip=3)  # three cells are recorded, the fourth meets a full disk
    _one_line_no_space(_invoke(calculate_metrics.cli, *sweep_args(sweep_assets, out)), 'cells.jsonl')
    _no_temporaries(out)
    lines = (out / 'cells.jsonl').read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line)['fid'] > 0 for line in lines)
    monkeypatch.undo()
    result = _invoke(calculate_metrics.cli, *sweep_args(sweep_assets, out))
    assert result.exit_code == 0, result.output
    assert len((out / 'cells.jsonl').read_text().splitlines()) == 8
    assert (out / 'cells.jsonl').read_text().splitlines()[:3] == lines  # the finished cells were kept


@pytest.mark.slow
def test_training(tmp_path, monkeypatch):
    data = tmp_path / 'data'
    data.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(8):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f'{i:03d}.png')
    run = tmp_path / 'run'
    args = ['--outdir', run, '--data', data, '--channels', 8, '--channel-mult', '1,2', '--num-blocks', 1,
            '--attn-res', '', '--device', 'cpu', '--rampup', 0, '--cond', 0, '--workers', 0, '--batch', 500,
            '--duration', 2000, '--checkpoint', 1000, '--snapshot', 0, '--status', 500]
    fill_disk(monkeypatch, 'training-state-0000002', budget=4096)
    _one_line_no_space(_invoke(train_edm2.main, *args), f'{run}/training-state-0000002.pt')
    _no_temporaries(run)
    assert (run / 'training-state-0000001.pt').exists() and not (run / 'training-state-0000002.pt').exists()
    monkeypatch.undo()
    result = _invoke(train_edm2.main, *args)
    assert result.exit_code == 0, result.output
    assert 'Resuming from' in result.output and (run / 'training-state-0000002.pt').exists()
    _no_temporaries(run)
