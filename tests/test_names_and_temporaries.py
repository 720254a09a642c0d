"""Every temporary is ours and is cleaned; names near the length limit, overlong paths, dangling symbolic
links and path-like names get one line or work."""

import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from click.testing import CliRunner

from edm2.commands import dataset_tool
from edm2.commands import generate_images
from edm2.commands import toy_example
from edm2 import fileio
from edm2.commands import checkpoint_cli
from edm2.checkpoint import load_network, save_network
from edm2.networks import build_network

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NET = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
           attn_resolutions=[], num_blocks=1, channels_per_head=8)


def _dead_pid():
    return int(subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True,
                              text=True).stdout)


def _one_line(result, *words):
    assert result.exit_code in (1, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith('Error:') and all(w in lines[-1] for w in words), result.output


def test_temporary_names_fit_the_name_limit_and_are_recognised(tmp_path):
    dead = _dead_pid()
    for length in (1, 100, 220, 226, 240, 252, 255):
        for stem in ('n' * length, 'é' * max(length // 2, 1)):  # also 2-byte characters
            tmp = fileio.temporary_name(tmp_path / stem)
            assert len(os.fsencode(tmp.name)) <= 255, (length, len(tmp.name))
            if length <= 200:  # short names are kept whole, and the temporary adds at most 30 characters
                assert tmp.name.startswith(f'.{stem}.edm2-') and len(tmp.name) - len(stem) <= 30, tmp.name
            stale = tmp.with_name(tmp.name.replace(f'.edm2-{os.getpid()}-', f'.edm2-{dead}-'))
            stale.write_bytes(b'partial')        # creatable: the name is legal
            tmp.write_bytes(b'live')
    removed = fileio.remove_stale_temporaries(tmp_path)
    assert len(removed) == 14 and all(f'.edm2-{dead}-' in p.name for p in removed)
    assert len(os.listdir(tmp_path)) == 14  # this (live) process's temporaries stay


@pytest.mark.parametrize('length', [226, 240, 252])
def test_files_with_names_near_the_limit_are_written(tmp_path, length):
    text = tmp_path / ('t' * length)
    fileio.atomic_write_text(text, 'ok')
    assert text.read_text() == 'ok'
    torch.manual_seed(0)
    net = build_network(dict(NET)).eval()
    path = tmp_path / ('n' * (length - len('.safetensors')) + '.safetensors')
    save_network(path, net)
    assert torch.equal(load_network(path).state_dict()['unet.out_gain'], net.state_dict()['unet.out_gain'])
    assert sorted(os.listdir(tmp_path)) == sorted([text.name, path.name])  # no temporary left


def test_toy_name_is_a_name_not_a_path(tmp_path):
    out = tmp_path / 'a' / 'b'
    for name in ('../../x', 'sub/x', '.hidden', '..', 'x' * 250):
        result = CliRunner().invoke(toy_example.cli, ['train', '--iterations', '2', '--batch', '8', '--width', '8',
                                                      '--outdir', str(out), '--name', name])
        _one_line(result, '--name')
    assert os.listdir(tmp_path) == []  # nothing written, inside --outdir or outside it


def test_overlong_and_dangling_outdirs_get_one_line(tmp_path):
    torch.manual_seed(0)
    net = tmp_path / 'net.safetensors'
    save_network(net, build_network(dict(NET)).eval())
    data = tmp_path / 'data'
    data.mkdir()
    PIL.Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(data / '0.png')
    (tmp_path / 'dangling').symlink_to(tmp_path / 'nowhere')
    for outdir, words in ((tmp_path / ('d' * 300), ['300 bytes', 'at most 255']),
                          (tmp_path / 'dangling', ['symbolic link', 'does not exist']),
                          (tmp_path / 'dangling' / 'sub', ['symbolic link', 'does not exist'])):
        before = sorted(os.listdir(tmp_path))
        runs = {
            'generate': (generate_images.main, ['--net', net, '--seeds', '0', '--steps', '2', '--device', 'cpu',
                                                '--outdir', outdir]),
            'toy': (toy_example.cli, ['train', '--iterations', '2', '--batch', '8', '--width', '8',
                                      '--outdir', outdir]),
            'dataset_tool': (dataset_tool.cli, ['convert', '--source', data, '--dest', outdir]),
        }
        for name, (command, args) in runs.items():
            _one_line(CliRunner().invoke(command, [str(a) for a in args]), *words)
        assert sorted(os.listdir(tmp_path)) == before and not (tmp_path / 'nowhere').exists()


# safetensors' own save_file writes `.tmpXXXXXX` beside the target: a killed writer must leave only
# temporaries in our pattern, which the next run removes.
_KILLED_WRITER = r'''
import os, signal, sys, threading, torch
from edm2 import checkpoint
from edm2.networks import build_network
net = build_network(dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=64, channel_mult=[1, 2, 2],
                         attn_resolutions=[], num_blocks=4, channels_per_head=64)).eval()
folder, target = sys.argv[1], sys.argv[2]
def watch():  # kill this process the moment any file appears in the folder, as a user's kill -9 would
    while not os.listdir(folder):
        pass
    os.kill(os.getpid(), signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
checkpoint.save_network(os.path.join(folder, target), net)
threading.Event().wait(30)
'''


@pytest.mark.slow
def test_a_killed_writer_leaves_only_our_temporaries_and_the_next_run_removes_them(tmp_path):
    folder = tmp_path / 'out'
    folder.mkdir()
    for attempt in range(3):
        proc = subprocess.run([sys.executable, '-c', _KILLED_WRITER, str(folder), 'net.safetensors'],
                              env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'), timeout=120)
        assert proc.returncode == -9
    left = os.listdir(folder)
    assert left and all(fileio._TEMP_RE.match(name) for name in left), left  # ours, none of safetensors'
    # The next conversion into that folder removes them.
    src = tmp_path / 'src.safetensors'
    torch.manual_seed(0)
    save_network(src, build_network(dict(NET)).eval())
    result = CliRunner().invoke(checkpoint_cli.cli, ['convert', str(src), str(folder / 'net.safetensors')])
    assert result.exit_code == 0, result.output
    assert os.listdir(folder) == ['net.safetensors']
