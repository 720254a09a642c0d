"""A non-editable install works away from the checkout and is import-safe: wheel → fresh venv beside a
dummy top-level `training` package and `dataset_tool` module → every console script, the presets and the
package data, with nothing of edm2 outside the `edm2` name."""

import hashlib
import os
import pathlib
import shutil
import site
import subprocess
import sys
import venv
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

CONSOLE_SCRIPTS = ('edm2-generate', 'edm2-train', 'edm2-phema', 'edm2-metrics', 'edm2-dataset', 'edm2-toy',
                   'edm2-checkpoint')
# Generic names another project may install at the top of site-packages: the wheel must not touch them.
DUMMIES = {'training/__init__.py': "WHO = 'the dummy training package'\n",
           'training/loop.py': "WHO = 'the dummy training.loop'\n",
           'dataset_tool.py': "WHO = 'the dummy dataset_tool'\n"}


def _run(args, cwd, env=None, check=True):
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f'{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}')
    return res


def _digests(root):
    return {name: hashlib.sha256((root / name).read_bytes()).hexdigest() for name in DUMMIES}


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A fresh venv holding the dummies and then the built wheel; the dependencies (torch, numpy, …) are
    borrowed from this interpreter's site-packages through a .pth file, which does not activate the editable
    install (a path listed in a .pth file is not itself a site directory: its .pth files are not read)."""
    tmp = tmp_path_factory.mktemp('wheel')
    source = tmp / 'source'  # a copy, so that the in-tree build leaves nothing in the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns('.git', '.venv', 'build', 'out', 'runs', '*.egg-info',
                                                                '__pycache__', '.pytest_cache'))
    _run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', str(tmp / 'dist'),
          str(source)], cwd=tmp)
    wheels = list((tmp / 'dist').glob('edm2-*.whl'))
    assert len(wheels) == 1
    env_dir = tmp / 'venv'
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / 'bin' / 'python'
    purelib = pathlib.Path(_run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                                cwd=tmp).stdout.strip())
    for name, text in DUMMIES.items():
        (purelib / name).parent.mkdir(parents=True, exist_ok=True)
        (purelib / name).write_text(text)
    before = _digests(purelib)
    deps = [p for p in site.getsitepackages() if pathlib.Path(p).is_dir()]
    (purelib / '_borrowed_deps.pth').write_text('\n'.join(deps) + '\n')
    _run([sys.executable, '-m', 'pip', '--python', str(py), 'install', '--no-deps', '-q', str(wheels[0])], cwd=tmp)
    work = tmp / 'elsewhere'
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'EDM2_CONFIG_DIR')}
    env['PATH'] = f'{env_dir / "bin"}{os.pathsep}{env.get("PATH", "")}'
    return dict(py=str(py), bin=env_dir / 'bin', cwd=work, env=env, wheel=wheels[0], purelib=purelib, before=before)


def _python(installed, code):
    return _run([installed['py'], '-c', code], cwd=installed['cwd'], env=installed['env']).stdout.split()


def test_wheel_holds_only_the_edm2_name_and_its_data(installed):
    with zipfile.ZipFile(installed['wheel']) as wheel:
        names = wheel.namelist()
    tops = {n.split('/')[0] for n in names}
    assert tops == {'edm2', 'edm2-0.1.0.dist-info'}, sorted(tops)
    for expected in ('edm2/toy/data/release-models-seed0.pt', 'edm2/configs/generate.toml', 'edm2/training/loop.py',
                     'edm2/sweep/run.py', 'edm2/commands/cli.py'):
        assert expected in names, expected
    assert not any(n.startswith('edm2/tests/') or '/fixtures/' in n for n in names)


def test_wheel_imports_from_the_venv_beside_a_dummy_training_package(installed):
    code = ('import edm2, edm2.training.loop, training, training.loop, dataset_tool; '
            'print(edm2.__file__, edm2.training.loop.__file__, training.__file__, training.WHO == "the dummy training '
            'package", training.loop.WHO == "the dummy training.loop", dataset_tool.WHO == "the dummy dataset_tool")')
    ours, loop, dummy, *who = _python(installed, code)
    purelib = str(installed['purelib']) + os.sep
    assert ours == purelib + os.path.join('edm2', '__init__.py'), ours  # not the checkout's editable install
    assert loop == purelib + os.path.join('edm2', 'training', 'loop.py'), loop
    assert dummy == purelib + os.path.join('training', '__init__.py') and who == ['True'] * 3, (dummy, who)
    assert _digests(installed['purelib']) == installed['before']


def test_every_console_script_runs_and_leaves_the_dummies_alone(installed):
    commands = [[str(installed['bin'] / script), '--help'] for script in CONSOLE_SCRIPTS]
    commands.append([installed['py'], '-m', 'edm2.commands.checkpoint_cli', '--help'])
    procs = [subprocess.Popen(c, cwd=installed['cwd'], env=installed['env'], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in commands]  # together: each imports torch
    for command, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0 and out.startswith('Usage:'), (command, proc.returncode, out[:200], err[-2000:])
    assert _digests(installed['purelib']) == installed['before']


def test_presets_and_package_data_come_from_the_venv(installed):
    code = ("from edm2 import presets, toy; p = presets.get('generate', 'edm2-img512-s-autog-fid'); "
            "print(presets.config_dir()); print(p['guidance']); print(toy.reference.data_dir()); "
            "print(sorted(toy.release_models()))")
    lines = _python(installed, code)
    assert lines[0].startswith(str(installed['purelib'])) and float(lines[1]) == 2.1
    assert lines[2].startswith(str(installed['purelib'])) and lines[3:] == ["['autoguide',", "'cfg_guide',", "'net']"]


def test_tiny_generation_end_to_end(installed):
    make_net = ("import torch, edm2; from edm2.networks import Precond; torch.manual_seed(0); "
                "net = Precond(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_channels=8, "
                "channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]); "
                "edm2.save_network('tiny.safetensors', net)")
    _run([installed['py'], '-c', make_net], cwd=installed['cwd'], env=installed['env'])
    _run([str(installed['bin'] / 'edm2-generate'), '--net', 'tiny.safetensors', '--seeds', '0-2', '--steps', '4',
          '--outdir', 'out', '--device', 'cpu'], cwd=installed['cwd'], env=installed['env'])
    assert sorted(p.name for p in (installed['cwd'] / 'out').iterdir()) == ['000000.png', '000001.png', '000002.png']
