"""What every command line shares: `--version`, `--threads` (the CPU thread policy of edm2.threads), usage
errors in one line with exit status 2; and the library's public names (`edm2.__all__`, `dir(edm2)`)."""

import importlib
import os
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

import edm2
from edm2 import threads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = [('generate_images', 'main'), ('train_edm2', 'main'), ('reconstruct_phema', 'main'),
            ('calculate_metrics', 'cli'), ('dataset_tool', 'cli'), ('toy_example', 'cli'), ('checkpoint_cli', 'cli'),
            ('download', 'cli')]


def command(module, attr):
    return getattr(importlib.import_module(f'edm2.commands.{module}'), attr)


def leaf_commands(cmd, path=()):
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from leaf_commands(sub, path + (name,))
    else:
        yield path, cmd


@pytest.mark.parametrize('module,attr', COMMANDS, ids=[m for m, _ in COMMANDS])
def test_version_threads_and_one_line_usage_errors(module, attr):
    cmd = command(module, attr)
    res = CliRunner().invoke(cmd, ['--version'], prog_name=module)
    assert res.exit_code == 0 and res.output == f'{module} (edm2) {edm2.__version__}\n'
    for path, leaf in leaf_commands(cmd):
        names = {opt for p in leaf.params for opt in p.opts}
        assert {'--threads', '--version'} <= names, (module, path)
        res = CliRunner().invoke(cmd, [*path, '--no-such-flag'], prog_name=module)
        assert res.exit_code == 2
        where = ' '.join((module, *path))
        assert res.output == f"Error: No such option '--no-such-flag' (see '{where} --help')\n", res.output


@pytest.mark.slow
def test_a_bad_value_is_one_line_from_the_script_too():
    run = subprocess.run([sys.executable, os.path.join(REPO, 'train_edm2.py'), '--outdir', 'x', '--data', 'y',
                          '--lr', 'nan'], capture_output=True, text=True, timeout=300)
    assert run.returncode == 2
    assert run.stderr == ("Error: Invalid value for '--lr': must be a finite number, got nan "
                          "(see 'train_edm2.py --help')\n")
    run = subprocess.run([sys.executable, os.path.join(REPO, 'toy_example.py')], capture_output=True, text=True,
                         timeout=300)
    assert (run.stdout + run.stderr).startswith('Usage: toy_example.py') and 'Commands:' in run.stderr + run.stdout
    # (no arguments: the whole help, as before, not a one-line error)


def test_thread_policy(monkeypatch):
    for var in ('EDM2_THREADS', 'OMP_NUM_THREADS'):
        monkeypatch.delenv(var, raising=False)
    assert threads.requested_threads() == threads.DEFAULT_THREADS == 1
    monkeypatch.setenv('OMP_NUM_THREADS', '3')
    assert threads.requested_threads() == 3
    monkeypatch.setenv('EDM2_THREADS', 'many')  # malformed: the next source decides
    assert threads.requested_threads() == 3
    monkeypatch.setenv('EDM2_THREADS', '2')
    assert threads.requested_threads() == 2 and threads.requested_threads(5) == 5
    assert threads.requested_threads(0) == os.cpu_count()


def test_threads_flag_sets_torch_and_children(monkeypatch):
    import torch
    monkeypatch.delenv('EDM2_THREADS', raising=False)
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    try:
        res = CliRunner().invoke(command('toy_example', 'cli'), ['train', '--threads', '2', '--outdir', 'x',
                                                                  '--classes', 'Z'])
        assert res.exit_code == 2 and '--classes' in res.output  # the command ran its checks after the flag
        assert torch.get_num_threads() == 2 and os.environ['OMP_NUM_THREADS'] == '2'
    finally:
        os.environ['OMP_NUM_THREADS'] = '1'  # what the flag changed, for the rest of the suite
        threads.configure()
    assert torch.get_num_threads() == 1


def test_commands_make_waiting_threads_sleep():
    code = 'import edm2.commands, os; print(os.environ.get("OMP_WAIT_POLICY"))'
    env = {k: v for k, v in os.environ.items() if k != 'OMP_WAIT_POLICY'}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == 'PASSIVE'


def test_public_api_is_listed_and_import_stays_cheap():
    assert {'load_network', 'load_snapshot', 'save_network', '__version__'} <= set(edm2.__all__)
    assert {'load_network', 'load_snapshot', 'save_network'} <= set(dir(edm2))
    code = 'import sys, edm2; print("torch" in sys.modules, "click" in sys.modules)'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert out.stdout.split() == ['False', 'False']
