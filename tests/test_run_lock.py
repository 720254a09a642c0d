"""One run per output folder: every command that writes a run folder refuses a second run in one line
naming the folder and the holder's process id; a killed holder (SIGKILL) never leaves a stale lock."""

import os
import select
import signal
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from helpers import write_snapshots

from edm2.commands import calculate_metrics
from edm2.commands import generate_images
from edm2.commands import reconstruct_phema
from edm2.commands import train_edm2

pytestmark = pytest.mark.usefixtures('one_thread')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Holds the lock the way a run does (flock on .edm2-run.lock, its pid inside), independently of the
# project's code, then waits to be killed.
_HOLDER = r'''
import fcntl, os, sys
folder = sys.argv[1]
os.makedirs(folder, exist_ok=True)
fd = os.open(os.path.join(folder, '.edm2-run.lock'), os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, f'{os.getpid()}\n'.encode())
print('held', flush=True)
sys.stdin.read()
'''


@pytest.fixture
def holder():
    """holder(folder) -> the Popen of a process holding the folder's run lock (killed with SIGKILL at the end)."""
    procs = []

    def start(folder):
        proc = subprocess.Popen([sys.executable, '-c', _HOLDER, str(folder)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready and proc.stdout.readline().strip() == 'held'
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def _one_line_refusal(result, folder, pid):
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 'Traceback' not in result.output
    assert lines[-1].startswith('Error:') and str(folder) in lines[-1] and f'process {pid}' in lines[-1], \
        result.output
    assert 'in use' in lines[-1]


def _invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.slow
def test_every_command_refuses_a_folder_in_use(tmp_path, holder):
    run = write_snapshots(tmp_path / 'run')
    data = tmp_path / 'data'
    data.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(4):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(data / f'{i}.png')
    commands = {
        'train': (train_edm2.main, ['--data', data, '--channels', 8, '--channel-mult', '1,2', '--num-blocks', 1,
                                    '--attn-res', '', '--device', 'cpu', '--rampup', 0, '--cond', 0, '--workers', 0,
                                    '--duration', 8, '--batch', 4]),
        'phema': (reconstruct_phema.main, ['--indir', run, '--outstd', '0.08', '--device', 'cpu']),
        'generate': (generate_images.main, ['--net', run / 'network-snapshot-0000016-0.100.safetensors',
                                            '--seeds', '0-1', '--batch', 2, '--steps', 2, '--device', 'cpu']),
        'sweep': (calculate_metrics.cli, ['sweep', '--net-dir', run, '--net-std', '0.08', '--gnet-dir', run,
                                          '--gnet-kimg', 8, '--gnet-std', '0.07', '--guidance', '2',
                                          '--ref', tmp_path / 'ref.pkl', '--num', 2, '--device', 'cpu']),
    }
    for name, (command, args) in commands.items():
        out = tmp_path / f'out-{name}'
        proc = holder(out)
        result = _invoke(command, *args, '--outdir', out)
        _one_line_refusal(result, out, proc.pid)
        assert os.listdir(out) == ['.edm2-run.lock'], (name, os.listdir(out))  # nothing written
        assert open(out / '.edm2-run.lock').read().strip() == str(proc.pid)   # the holder's lock untouched


def test_a_killed_holder_leaves_no_stale_lock_and_the_folder_is_released_after_a_run(tmp_path, holder):
    from edm2.run_lock import FolderInUseError, hold_run_folder
    out = tmp_path / 'out'
    proc = holder(out)
    with pytest.raises(FolderInUseError, match=f'process {proc.pid}'):
        with hold_run_folder(out):
            pass
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with hold_run_folder(out):  # the kernel dropped the dead process's lock
        assert open(out / '.edm2-run.lock').read().split() == [str(os.getpid()), socket.gethostname()]
        (out / 'result.txt').write_text('done')
    assert os.listdir(out) == ['result.txt']  # a finished run leaves no lock file
    # A folder created by the lock and left empty (the run refused its input) is removed again.
    fresh = tmp_path / 'fresh'
    with pytest.raises(RuntimeError):
        with hold_run_folder(fresh):
            raise RuntimeError('bad input found after the lock was taken')
    assert not fresh.exists()


@pytest.mark.slow
def test_two_processes_one_folder_one_refused(tmp_path):
    """Two real processes started together on one folder: exactly one takes it."""
    script = ('import sys, time\nfrom edm2.run_lock import hold_run_folder, FolderInUseError\n'
              'try:\n    with hold_run_folder(sys.argv[1]):\n        print("ran", flush=True); time.sleep(3)\n'
              'except FolderInUseError as e:\n    print("refused", e, flush=True)\n')
    env = dict(os.environ, PYTHONPATH=REPO)
    procs = [subprocess.Popen([sys.executable, '-c', script, str(tmp_path / 'out')], stdout=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outputs = sorted(p.communicate(timeout=60)[0].strip() for p in procs)
    assert outputs[0] == 'ran' and outputs[1].startswith('refused'), outputs
    assert str(tmp_path / 'out') in outputs[1]


@pytest.mark.slow
def test_torchrun_ranks_agree_on_a_refusal(tmp_path, holder):
    """Under torchrun rank 0 takes the lock; every rank stops, and the refusal is printed once."""
    run = write_snapshots(tmp_path / 'run')
    out = tmp_path / 'out'
    proc = holder(out)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             'reconstruct_phema.py', '--indir', str(run), '--outdir', str(out), '--outstd', '0.08',
                             '--device', 'cpu'], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1'))
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith('Error:') and 'in use' in line]
    assert len(refusals) == 1 and f'process {proc.pid}' in refusals[0], result.stderr[-3000:]
    assert os.listdir(out) == ['.edm2-run.lock']
