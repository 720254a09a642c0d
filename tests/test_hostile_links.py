"""No file outside the output folder is ever written: a symbolic link (or another kind of file) planted in an
output folder by someone else who can write there is refused in one line, never written through: the run lock
(edm2.run_lock), the temporaries of every output (edm2.fileio), logs appended to, a dataset built as a folder."""

import os
import subprocess
import sys

import pytest
import torch

from edm2 import fileio
from edm2.checkpoint import save_network
from edm2.networks import build_network
from edm2.run_lock import FolderInUseError, hold_run_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECRET = 'the content of a file of the victim\n'
NET = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1],
           attn_resolutions=[], num_blocks=1, channels_per_head=8)


def _victim(tmp_path):
    """A file outside the output folder that a planted link points to."""
    (tmp_path / 'home').mkdir()
    path = tmp_path / 'home' / '.bashrc'
    path.write_text(SECRET)
    os.chmod(path, 0o600)
    return path


def _untouched(path):
    assert path.read_text() == SECRET and oct(path.stat().st_mode & 0o777) == oct(0o600)


@pytest.mark.slow
def test_a_planted_lock_link_is_refused_by_a_real_run(tmp_path):
    """A real reconstruct_phema.py process on a folder whose .edm2-run.lock is a link to a file outside it (and
    one whose lock is a link to a file not there yet): one line, exit status 1, nothing written through."""
    victim = _victim(tmp_path)
    run = tmp_path / 'run'
    run.mkdir()
    torch.manual_seed(0)
    net = build_network(dict(NET))
    for std in (0.05, 0.10):
        save_network(run / f'network-snapshot-0000016-{std:.3f}.safetensors', net, kimg=16, ema_std=std)
    for target in (victim, tmp_path / 'home' / 'new-file'):
        out = tmp_path / f'out-{target.name}'
        out.mkdir()
        os.symlink(target, out / '.edm2-run.lock')
        result = subprocess.run([sys.executable, 'reconstruct_phema.py', '--indir', str(run), '--outdir', str(out),
                                 '--outstd', '0.08', '--device', 'cpu'], cwd=REPO, capture_output=True, text=True,
                                timeout=120, env=dict(os.environ, OMP_NUM_THREADS='1'))
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr[-2000:]
        assert lines[-1].startswith('Error:') and str(out) in lines[-1] and 'symbolic link' in lines[-1], lines
        assert os.listdir(out) == ['.edm2-run.lock'] and (out / '.edm2-run.lock').is_symlink()
    _untouched(victim)
    assert sorted(os.listdir(tmp_path / 'home')) == ['.bashrc']


def test_a_lock_that_is_not_a_regular_file_of_ours_is_refused(tmp_path):
    victim = _victim(tmp_path)
    cases = {'fifo': lambda p: os.mkfifo(p), 'folder': lambda p: os.mkdir(p),
             'hard link': lambda p: os.link(victim, p)}
    for name, plant in cases.items():
        out = tmp_path / name.replace(' ', '-')
        out.mkdir()
        plant(out / '.edm2-run.lock')
        with pytest.raises(FolderInUseError, match='refusing to write through it|Is a directory'):
            with hold_run_folder(out):
                raise AssertionError(f'{name}: the run started')
    _untouched(victim)


def test_temporaries_and_logs_never_write_through_a_link(tmp_path):
    victim = _victim(tmp_path)
    out = tmp_path / 'out'
    out.mkdir()
    # A link planted under a temporary's name (the name is listed in the folder while a write runs).
    with pytest.raises(fileio.UnsafePathError), fileio.atomic_write(out / 'stats.json', 'w') as f:
        tmp = out / os.listdir(out)[0]
        os.unlink(tmp)
        os.symlink(victim, tmp)
        f.write('x' * 100)
        f.flush()
    assert not (out / 'stats.json').exists() and not os.path.lexists(tmp)
    with pytest.raises(fileio.UnsafePathError), fileio.atomic_path(out / 'figure.png') as tmp:
        os.unlink(tmp)
        os.symlink(victim, tmp)
        with fileio.open_temporary(tmp) as f:
            f.write(b'x')
    assert not (out / 'figure.png').exists()
    # A log appended to (log.txt, stats.jsonl, cells.jsonl), planted as a link or a FIFO.
    os.symlink(victim, out / 'log.txt')
    with pytest.raises(fileio.UnsafePathError, match='symbolic link'):
        fileio.open_append(out / 'log.txt')
    os.mkfifo(out / 'stats.jsonl')
    with pytest.raises(fileio.UnsafePathError, match='not a regular file'):
        fileio.open_append(out / 'stats.jsonl')
    with pytest.raises(FileExistsError):
        fileio.create_new(out / 'log.txt')
    _untouched(victim)
    with fileio.open_append(out / 'ok.jsonl') as f:  # a missing log is created; a regular one appended to
        f.write('a\n')
    with fileio.open_append(out / 'ok.jsonl') as f:
        f.write('b\n')
    assert (out / 'ok.jsonl').read_text() == 'a\nb\n'


def test_a_dataset_folder_under_construction_is_written_through_its_descriptor(tmp_path, monkeypatch):
    """dataset_tool's folder output is built in a private folder: renaming it away and planting a link in its
    place while the conversion runs redirects nothing."""
    from edm2.commands import dataset_tool
    victim_dir = tmp_path / 'home'
    victim_dir.mkdir()
    dest = tmp_path / 'shared' / 'ds'
    out = dataset_tool._Destination(dest)
    assert oct(os.stat(out.tmp).st_mode & 0o777) == oct(0o700)
    out.write('00000/img00000000.png', b'first')
    os.rename(out.tmp, tmp_path / 'shared' / 'moved')
    os.symlink(victim_dir, out.tmp)
    out.write('00000/img00000001.png', b'second')
    out.write('dataset.json', b'{}')
    assert os.listdir(victim_dir) == []
    assert sorted(os.listdir(tmp_path / 'shared' / 'moved' / '00000')) == ['img00000000.png', 'img00000001.png']
    out.abort()
