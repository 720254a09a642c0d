"""A non-editable install works away from the checkout: wheel → fresh venv → console scripts and presets."""

import os
import pathlib
import shutil
import site
import subprocess
import sys
import venv

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def _run(args, cwd, env=None, check=True):
    res = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f'{args} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}')
    return res


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A fresh venv holding only the built wheel; the dependencies (torch, numpy, …) are borrowed from
    this interpreter's site-packages through a .pth file, which does not activate the editable install."""
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
    purelib = _run([str(py), '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'], cwd=tmp).stdout.strip()
    deps = [p for p in site.getsitepackages() if pathlib.Path(p).is_dir()]
    pathlib.Path(purelib, '_borrowed_deps.pth').write_text('\n'.join(deps) + '\n')
    _run([sys.executable, '-m', 'pip', '--python', str(py), 'install', '--no-deps', '-q', str(wheels[0])], cwd=tmp)
    work = tmp / 'elsewhere'
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'EDM2_CONFIG_DIR')}
    env['PATH'] = f'{env_dir / "bin"}{os.pathsep}{env.get("PATH", "")}'
    return dict(py=str(py), bin=env_dir / 'bin', cwd=work, env=env)


def test_wheel_imports_from_site_packages_not_the_checkout(installed):
    out = _run([installed['py'], '-c', 'import edm2, generate_images; print(edm2.__file__); print(generate_images.__file__)'],
               cwd=installed['cwd'], env=installed['env']).stdout.split()
    assert all('site-packages' in p and not p.startswith(str(REPO) + os.sep) for p in out), out


def test_console_scripts_and_presets(installed):
    for script in ('edm2-generate', 'edm2-train', 'edm2-phema', 'edm2-metrics', 'edm2-dataset', 'edm2-toy'):
        res = _run([str(installed['bin'] / script), '--help'], cwd=installed['cwd'], env=installed['env'])
        assert 'Usage:' in res.stdout, script
    code = ("from edm2 import presets; p = presets.get('generate', 'edm2-img512-s-autog-fid'); "
            "print(presets.config_dir()); print(p['guidance'])")
    lines = _run([installed['py'], '-c', code], cwd=installed['cwd'], env=installed['env']).stdout.split()
    assert 'site-packages' in lines[0] and float(lines[1]) == 2.1


def test_tiny_generation_end_to_end(installed):
    make_net = ("import torch, edm2; from edm2.networks import Precond; torch.manual_seed(0); "
                "net = Precond(img_resolution=8, img_channels=3, label_dim=0, use_fp16=False, model_channels=8, "
                "channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4]); "
                "edm2.save_network('tiny.safetensors', net)")
    _run([installed['py'], '-c', make_net], cwd=installed['cwd'], env=installed['env'])
    _run([str(installed['bin'] / 'edm2-generate'), '--net', 'tiny.safetensors', '--seeds', '0-2', '--steps', '4',
          '--outdir', 'out', '--device', 'cpu'], cwd=installed['cwd'], env=installed['env'])
    assert sorted(p.name for p in (installed['cwd'] / 'out').iterdir()) == ['000000.png', '000001.png', '000002.png']
