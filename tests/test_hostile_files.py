"""Hostile or damaged files and paths given to the checkpoint, phema and reference-statistics readers.

Every case asserts: the exit status (or the error type for library calls), a single-line message that
names the file and the field or flag at fault, no traceback, nothing under a final output name, and,
for subprocesses, that the process has ended.
"""

import json
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from edm2.commands import checkpoint_cli
from edm2.checkpoint import CheckpointError, load_network, save_network
from edm2.metrics.reference import ReferenceFileError, load_reference
from edm2.networks import build_network

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(img_resolution=8, img_channels=3, label_dim=0, model_channels=8, channel_mult=[1, 2],
            attn_resolutions=[4], num_blocks=1, channels_per_head=8)


def _tiny_net(seed=0):
    torch.manual_seed(seed)
    return build_network(dict(TINY)).eval()


def _header(net, **changes):
    doc = {'format': 'edm2-network', 'format_version': 1, 'class': 'Precond', 'init_kwargs': net.init_kwargs,
           'encoder': None, 'gain_precision': None, 'kimg': 16, 'ema_std': 0.1, 'metadata': {}}
    for key, value in changes.items():
        if value is _DELETE:
            doc.pop(key)
        else:
            doc[key] = value
    return doc


_DELETE = object()


def _write_native(path, net, doc, raw=None):
    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(path), metadata={'edm2': raw if raw is not None else json.dumps(doc)})
    return path


def _assert_one_line(result, *words, code=1):
    assert result.exit_code == code, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert 'Traceback' not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    assert lines[-1].startswith('Error:'), result.output
    for word in words:
        assert str(word) in lines[-1], (word, lines[-1])
    return lines[-1]


def _run(*args, timeout=120, env=None, **kwargs):
    full_env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1', **(env or {}))
    return subprocess.run([sys.executable, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env, **kwargs)


# ------------------------------------------------------------------------------------------------
# Malformed fields of a native header: one line naming the file and the field.

@pytest.mark.parametrize('field, value', [
    ('init_kwargs', [1, 2]),
    ('init_kwargs', 'img_resolution=8'),
    ('kimg', '16'),
    ('kimg', -3),
    ('kimg', True),
    ('kimg', 1.5),
    ('format_version', 2),
    ('format_version', '1'),
    ('format_version', 0),
    ('format_version', _DELETE),
    ('class', 'os.system'),
    ('class', ['Precond']),
    ('ema_std', 'wide'),
    ('ema_std', 0.5),
    ('ema_std', -0.1),
    ('gain_precision', 'fp8'),
    ('encoder', 'StandardRGBEncoder'),
    ('metadata', [1]),
])
def test_malformed_header_field(tmp_path, field, value):
    path = _write_native(tmp_path / 'net.safetensors', _tiny_net(), _header(_tiny_net(), **{field: value}))
    with pytest.raises(CheckpointError) as e:
        load_network(path)
    message = str(e.value)
    assert str(path) in message and field in message and '\n' not in message
    dst = tmp_path / 'out.safetensors'
    result = CliRunner().invoke(checkpoint_cli.cli, ['convert', str(path), str(dst)])
    _assert_one_line(result, path, field)
    assert not dst.exists() and sorted(os.listdir(tmp_path)) == ['net.safetensors']


@pytest.mark.parametrize('raw, words', [
    ('{"format": "edm2-network", "format_version": 1,', ['unreadable']),       # truncated JSON
    ('[1, 2, 3]', ['unknown format']),
    ('{"format": "edm2-network", "format_version": 1, "class": "Precond", "init_kwargs": {}, "ema_std": NaN}',
     ['ema_std']),
    ('{"format": "something-else"}', ['unknown format']),
])
def test_malformed_header_document(tmp_path, raw, words):
    path = _write_native(tmp_path / 'net.safetensors', _tiny_net(), None, raw=raw)
    result = CliRunner().invoke(checkpoint_cli.cli, ['info', str(path)])
    _assert_one_line(result, path, *words)


def test_malformed_metadata_fields_and_encoder_spec(tmp_path):
    net = _tiny_net()
    cases = [({'metadata': {'nimg': 'many'}}, 'metadata.nimg'),
             ({'metadata': {'nimg': -5}}, 'metadata.nimg'),
             ({'encoder': {'class': 'Evil'}}, 'encoder'),
             ({'init_kwargs': dict(net.init_kwargs, model_channels='eight')}, 'model_channels'),
             ({'init_kwargs': dict(net.init_kwargs, no_such_argument=1)}, 'no_such_argument')]
    for i, (changes, word) in enumerate(cases):
        path = _write_native(tmp_path / f'n{i}.safetensors', net, _header(net, **changes))
        with pytest.raises(CheckpointError, match=word) as e:
            load_network(path)
        assert str(path) in str(e.value) and '\n' not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Memory from tiny inputs: the header's network is compared with the stored shapes before allocation.

_PEAK_SCRIPT = '''
import resource, sys, time
from edm2.checkpoint import CheckpointError, load_network
t0 = time.perf_counter()
try:
    load_network(sys.argv[1])
except CheckpointError as e:
    print('ERROR', e)
print('SECONDS', time.perf_counter() - t0)
try:  # this process's own peak (ru_maxrss would carry the forking parent's peak through fork and exec)
    with open('/proc/self/status') as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
except OSError:
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print('MAXRSS_MIB', peak_kib / 1024)
'''


@pytest.mark.slow
@pytest.mark.parametrize('changes, word', [
    (dict(model_channels=1024), 'parameters, above the limit'),        # 8 GB of parameters claimed
    (dict(model_channels=8, num_blocks=20000), 'num_blocks'),          # 100k blocks to construct
    (dict(channel_mult=[1] * 5000), 'channel_mult'),
    (dict(model_channels=10 ** 12), ''),                               # does not fit any tensor
])
def test_header_cannot_make_us_allocate(tmp_path, changes, word):
    net = _tiny_net()
    path = _write_native(tmp_path / 'big.safetensors', net,
                         _header(net, init_kwargs=dict(net.init_kwargs, **changes)))
    assert path.stat().st_size < 1_000_000
    proc = _run('-c', _PEAK_SCRIPT, path)
    assert proc.returncode == 0, proc.stderr
    out = dict(line.split(' ', 1) for line in proc.stdout.strip().splitlines())
    assert str(path) in out['ERROR'] and word in out['ERROR'] and 'Traceback' not in proc.stderr
    # A Python with torch imported is ~400 MiB here; the claimed network would be gigabytes.
    assert float(out['MAXRSS_MIB']) < 1000 and float(out['SECONDS']) < 10, out


def test_published_pickle_arguments_are_checked_the_same_way(tmp_path):
    from helpers import write_published
    net = _tiny_net()
    net.init_kwargs = dict(net.init_kwargs, model_channels=1024)  # recorded arguments claim a huge network
    path = write_published(tmp_path / 'big.pkl', net)
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match='above the limit') as e:
        load_network(path)
    assert time.perf_counter() - t0 < 10 and str(path) in str(e.value) and '\n' not in str(e.value)


# ------------------------------------------------------------------------------------------------
# Permissions: outputs get 0666 minus the umask, although safetensors replaces our temporary file.

@pytest.mark.parametrize('umask', [0o022, 0o077, 0o027])
def test_native_outputs_follow_the_umask(tmp_path, umask):
    net = _tiny_net()
    old = os.umask(umask)
    try:
        save_network(tmp_path / 'a.safetensors', net)
        result = CliRunner().invoke(checkpoint_cli.cli, ['convert', str(tmp_path / 'a.safetensors'),
                                                         str(tmp_path / 'b.safetensors')])
        assert result.exit_code == 0, result.output
        _make_run(tmp_path / 'run', net)
        result = CliRunner().invoke(_reconstruct_main(), ['--indir', tmp_path / 'run', '--outdir', tmp_path / 'out',
                                                          '--outstd', '0.07,0.12', '--device', 'cpu'])
        assert result.exit_code == 0, result.output
    finally:
        os.umask(old)
    outputs = [tmp_path / 'a.safetensors', tmp_path / 'b.safetensors'] + sorted((tmp_path / 'out').iterdir())
    assert len(outputs) == 4
    for path in outputs:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


# ------------------------------------------------------------------------------------------------
# reconstruct_phema.py: bad paths and values are refused in one line before any work.

def _reconstruct_main():
    from edm2.commands import reconstruct_phema
    return reconstruct_phema.main


def _make_run(folder, net, times=(8, 16), stds=(0.05, 0.10)):
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    for kimg in times:
        for std in stds:
            with torch.no_grad():
                for p in net.parameters():
                    p.add_(torch.randn_like(p), alpha=0.01)
            save_network(folder / f'network-snapshot-{kimg:07d}-{std:.3f}.safetensors', net, kimg=kimg, ema_std=std)
    return folder


def test_reconstruct_refuses_bad_paths_and_values(tmp_path):
    run = _make_run(tmp_path / 'run', _tiny_net())
    a_file = tmp_path / 'file.txt'
    a_file.write_text('x')
    empty = tmp_path / 'empty'
    empty.mkdir()
    other = tmp_path / 'other'
    other.mkdir()
    (other / 'readme.txt').write_text('no snapshots here')
    (other / 'foreign.safetensors').write_bytes(b'\x00' * 32)  # not ours and not named like a snapshot
    blocked = tmp_path / 'blocked'
    (blocked / 'phema-0000016-0.070.safetensors').mkdir(parents=True)  # a folder where an output goes
    cases = [
        (['--indir', run, '--outdir', a_file, '--outstd', '0.1'], ['--outdir', 'not a folder'], 2),
        (['--indir', run, '--outdir', a_file / 'sub', '--outstd', '0.1'], ['--outdir', 'cannot be created'], 2),
        (['--indir', a_file, '--outdir', tmp_path / 'o', '--outstd', '0.1'], ['--indir', 'not a folder'], 2),
        (['--indir', empty, '--outdir', tmp_path / 'o', '--outstd', '0.1'], ['no snapshots', str(empty)], 1),
        (['--indir', other, '--outdir', tmp_path / 'o', '--outstd', '0.1'], ['no snapshots', str(other)], 1),
        (['--indir', run, '--outdir', blocked, '--outstd', '0.07'], ['--outdir', 'not a file'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', 'nan'], ['--outstd', 'finite'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1,inf'], ['--outstd', 'finite'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.30'], ['--outstd', 'must lie in'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--instd', '1e300'], ['--instd'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--batch', '0'], ['--batch'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--outkimg', '-1'], ['--outkimg'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--outkimg', '12'], ['--outkimg 12'], 1),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--outprefix', '../x'], ['--outprefix'], 2),
        (['--indir', run, '--outdir', tmp_path / 'o', '--outstd', '0.1', '--device', 'tpu:7'], ['--device'], 1),
    ]
    for args, words, code in cases:
        before = sorted(p.name for p in tmp_path.rglob('*'))
        _assert_one_line(CliRunner().invoke(_reconstruct_main(), [str(a) for a in args]), *words, code=code)
        assert sorted(p.name for p in tmp_path.rglob('*')) == before, args  # nothing created


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write to any folder')
def test_reconstruct_refuses_unwritable_outdir(tmp_path):
    run = _make_run(tmp_path / 'run', _tiny_net())
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        for outdir in (locked, locked / 'sub'):
            result = CliRunner().invoke(_reconstruct_main(), ['--indir', str(run), '--outdir', str(outdir),
                                                              '--outstd', '0.1'])
            _assert_one_line(result, '--outdir', code=2)
    finally:
        locked.chmod(0o700)


def test_reconstruct_refuses_hostile_input_headers(tmp_path):
    net = _tiny_net()
    run = _make_run(tmp_path / 'run', net)
    bad = run / 'network-snapshot-0000016-0.100.safetensors'
    _write_native(bad, net, _header(net, kimg='sixteen'))
    result = CliRunner().invoke(_reconstruct_main(), ['--indir', str(run), '--outdir', str(tmp_path / 'o'),
                                                      '--outstd', '0.1'])
    _assert_one_line(result, bad.name, 'kimg')
    assert not (tmp_path / 'o').exists()


# ------------------------------------------------------------------------------------------------
# kill -9 during reconstruct_phema.py: the next run removes the hidden temporaries it left.

_SLOW_WRITER = '''
import sys, time
import edm2.checkpoint, reconstruct_phema
save = edm2.checkpoint.save_network
def slow_save(path, *args, **kwargs):
    result = save(path, *args, **kwargs)
    print('WROTE', path, flush=True)
    time.sleep(600)  # killed here: a complete temporary of the batch is on disk
    return result
edm2.checkpoint.save_network = slow_save
reconstruct_phema.main(sys.argv[1:])
'''


@pytest.mark.slow
def test_kill_9_leaves_temporaries_that_the_next_run_removes(tmp_path):
    run = _make_run(tmp_path / 'run', _tiny_net())
    out = tmp_path / 'out'
    args = ['--indir', run, '--outdir', out, '--outstd', '0.07,0.12', '--device', 'cpu']
    proc = subprocess.Popen([sys.executable, '-c', _SLOW_WRITER, *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    try:
        deadline = time.time() + 120
        line = ''
        while not line.startswith('WROTE') and time.time() < deadline:
            line = proc.stdout.readline()
            assert line or proc.poll() is None, proc.stderr.read()
        assert line.startswith('WROTE'), line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    left = sorted(p.name for p in out.iterdir() if p.name != '.edm2-run.lock')  # the lock file may stay
    assert left and all(name.startswith('.') and name.endswith('.tmp') for name in left), left
    assert sum((out / name).stat().st_size for name in left) > 10_000  # a full-size network
    result = _run('reconstruct_phema.py', *args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ['phema-0000016-0.070.safetensors',
                                                     'phema-0000016-0.120.safetensors']
    assert 'left by an interrupted run' in result.stdout
    load_network(out / 'phema-0000016-0.070.safetensors')


# ------------------------------------------------------------------------------------------------
# Malformed reference statistics: one line naming the file and the key.

def _ref(path, ref):
    with open(path, 'wb') as f:
        pickle.dump(ref, f, protocol=4)
    return path


@pytest.mark.parametrize('ref, key', [
    ({'fid': {'mu': np.array(['a', 'b']), 'sigma': np.eye(2)}}, 'fid.mu'),
    ({'fid': {'mu': [[1.0, 2.0], [3.0]], 'sigma': np.eye(2)}}, 'fid.mu'),                  # ragged
    ({'fid': {'mu': np.array([1, 'x', None], dtype=object), 'sigma': np.eye(3)}}, 'fid.mu'),  # object array
    ({'fid': {'mu': np.zeros(3), 'sigma': np.zeros((3, 4))}}, 'fid'),
    ({'fid': {'mu': np.zeros((3, 1)), 'sigma': np.eye(3)}}, 'fid.mu'),
    ({'fid': {'mu': np.zeros(3), 'sigma': np.full((3, 3), np.nan)}}, 'fid.sigma'),
    ({'fd_dinov2': {'mu': 'zeros', 'sigma': np.eye(3)}}, 'fd_dinov2.mu'),
    ({'fd_dinov2': {'mu': np.zeros(0), 'sigma': np.zeros((0, 0))}}, 'fd_dinov2.mu'),
    ({'fid': {'mu': np.zeros(2), 'sigma': np.eye(2)}, 'features': {'inception': np.zeros(5)}}, 'features.inception'),
    ({'fid': {'mu': np.zeros(2), 'sigma': np.eye(2)}, 'features': {'dinov2': [[1.0], [2.0, 3.0]]}}, 'features.dinov2'),
    ({'fid': {'mu': np.zeros(2, dtype=complex), 'sigma': np.eye(2)}}, 'fid.mu'),
])
def test_malformed_reference_statistics(tmp_path, ref, key):
    path = _ref(tmp_path / 'ref.pkl', ref)
    with pytest.raises(ReferenceFileError) as e:
        load_reference(path)
    message = str(e.value)
    assert str(path) in message and key in message and '\n' not in message, message


def test_malformed_reference_npz(tmp_path):
    path = tmp_path / 'ref.npz'
    np.savez(path, mu=np.array(['a', 'b']), sigma=np.eye(2))
    with pytest.raises(ReferenceFileError, match='fid.mu') as e:
        load_reference(path)
    assert str(path) in str(e.value)
    np.savez(path, mu=np.zeros(2), sigma=np.eye(3))
    with pytest.raises(ReferenceFileError, match='expected') as e:
        load_reference(path)
    assert str(path) in str(e.value) and '\n' not in str(e.value)


@pytest.mark.slow
def test_reconstruct_under_torchrun_splits_outputs_and_cleans_up(tmp_path):
    """Two gloo processes share the outputs; a stale temporary of a dead process is removed once."""
    run = _make_run(tmp_path / 'run', _tiny_net())
    out = tmp_path / 'out'
    out.mkdir()
    from edm2 import fileio
    stale = fileio.temporary_name(out / 'phema-0000016-0.090.safetensors')
    stale = stale.with_name(stale.name.replace(f'edm2-{os.getpid()}-', 'edm2-999999999-'))
    stale.write_bytes(b'\x00' * 4096)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'reconstruct_phema.py',
                             '--indir', str(run), '--outdir', str(out), '--outstd', '0.07,0.09,0.11',
                             '--device', 'cpu'], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == [f'phema-0000016-{s}.safetensors' for s in ('0.070', '0.090', '0.110')]
    single = tmp_path / 'single'
    assert _run('reconstruct_phema.py', '--indir', run, '--outdir', single, '--outstd', '0.09').returncode == 0
    a = load_network(out / 'phema-0000016-0.090.safetensors').state_dict()
    b = load_network(single / 'phema-0000016-0.090.safetensors').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
