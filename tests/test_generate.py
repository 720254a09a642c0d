"""generate_images.py: flags, presets, files, bad input, resume, grid, torchrun, and parity with the release."""

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from helpers import pngs, run_cli

from edm2.commands import generate_images
from edm2 import generation, presets, sampling

REPO = pathlib.Path(__file__).resolve().parent.parent
ROOT = 'https://nvlabs-fi-cdn.nvidia.com/edm2/posthoc-reconstructions'

# Published snapshots store their weights in float16, and the published MPConv then computes the scalar
# gain / sqrt(fan_in) in float16 (learned gains: emb_gain, out_gain). With that reproduced in the network
# the sampler matches generate-rgb16.pt bit for bit; without it about 2% of pixels differ by one level.
PARITY_HINT = ' (check that the network matches main-rgb16-denoise.pt, including the float16 gain arithmetic)'


pytestmark = pytest.mark.usefixtures('one_thread')


def read_png(path):
    return torch.from_numpy(np.array(PIL.Image.open(path))).permute(2, 0, 1)


def library_images(paths, seeds, gnets=(), guidance=1.0, guide_weights=None, interval=None, num_steps=32,
                   classes='random', batch_size=32, **churn):
    import edm2
    net, enc, _ = edm2.load_snapshot(paths['main'])
    g = tuple(edm2.load_snapshot(paths[name])[0] for name in gnets)
    spec = sampling.Guidance(g, guidance, guide_weights, interval)
    out = {}
    for b in generation.generate(net, seeds, encoder=enc, guidance=spec, sigmas=sampling.edm_schedule(num_steps),
                                 options=sampling.HeunOptions(**churn), classes=classes, batch_size=batch_size):
        out.update({s: img for s, img in zip(b.seeds, b.images)})
    return out


# ----------------------------------------------------------------------------------------------------
# Parsing and presets.

def test_parse_seeds():
    assert list(generate_images.parse_seeds('0-3,7, 10-11')) == [0, 1, 2, 3, 7, 10, 11]
    assert list(generate_images.parse_seeds('5')) == [5]
    for bad in ['', 'a', '1-x', '5-2', '-3', '1,,2', '1.5']:
        with pytest.raises(ValueError):
            generate_images.parse_seeds(bad)
    huge = generate_images.parse_seeds('0-999999999999999')  # lazy: no list of 10^15 numbers
    assert len(huge) == 10 ** 15 and huge[-1] == 10 ** 15 - 1


def test_presets_cover_the_published_table():
    table = presets.load('generate')
    sizes512 = ['xs', 's', 'm', 'l', 'xl', 'xxl']
    expected = ([f'edm2-img512-{s}-{m}' for s in sizes512 for m in ('fid', 'dino')]
                + [f'edm2-img64-{s}-fid' for s in ('s', 'm', 'l', 'xl')]
                + [f'edm2-img512-{s}-guid-{m}' for s in sizes512 for m in ('fid', 'dino')]
                + [f'edm2-img512-{s}-autog-{m}' for s in ('s', 'xxl') for m in ('fid', 'dino')]
                + ['edm2-img512-s-uncond-autog-fid', 'edm2-img512-s-uncond-autog-dino',
                   'edm2-img64-s-autog-fid', 'edm2-img64-s-autog-dino',
                   'edm2-img512-s-guid-interval-fid', 'edm2-img512-xxl-guid-interval-fid',
                   'if-xl-autog-m', 'if-xl-cfg'])
    assert sorted(table) == sorted(expected)
    for name, cfg in table.items():
        if name.startswith('if-'):  # DeepFloyd IF (diffusers models): tests/test_external_models.py
            continue
        urls = [cfg['net']] + ([cfg['gnet']] if 'gnet' in cfg else [])
        for url in urls:
            assert url.startswith(ROOT + '/edm2-img') and url.endswith('.pkl'), (name, url)
        assert ('gnet' in cfg) == (cfg['guidance'] != 1), name
        if '-guid-' in name:  # CFG: the unconditional XS net with the same EMA length
            assert cfg['gnet'] == f'{ROOT}/edm2-img512-xs-uncond-2147483-{cfg["net"][-9:-4]}.pkl', name
    # A few rows spelled out (the papers' tables).
    assert table['edm2-img512-xxl-autog-fid'] == dict(
        net=f'{ROOT}/edm2-img512-xxl-0939524-0.075.pkl', gnet=f'{ROOT}/edm2-img512-m-0268435-0.155.pkl',
        guidance=2.05, reported='FID 1.25')
    assert table['edm2-img64-s-autog-dino']['gnet'] == f'{ROOT}/edm2-img64-xs-0134217-0.175.pkl'
    assert table['edm2-img512-l-dino']['net'] == f'{ROOT}/edm2-img512-l-1879048-0.155.pkl'
    assert table['edm2-img512-m-guid-dino']['guidance'] == 2.0
    assert table['edm2-img512-s-guid-interval-fid']['guidance_interval'] == [0.28, 2.9]
    xxl = table['edm2-img512-xxl-guid-interval-fid']
    assert xxl['guidance_interval_steps'] == [17, 22] and xxl['guidance'] == 2.0 and 'guidance_interval' not in xxl
    assert xxl['net'] == f'{ROOT}/edm2-img512-xxl-0939524-0.015.pkl'
    assert xxl['gnet'] == f'{ROOT}/edm2-img512-xs-uncond-2147483-0.015.pkl'
    assert table['edm2-img512-s-guid-interval-fid']['guidance'] == 2.1


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, no traceback, no PNG.

def _closed_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.parametrize('case, message', [
    ('guidance without gnet', 'needs a guiding network'),
    ('guide resolution', 'img_resolution=16'),
    ('guide channels', 'img_channels=4'),
    ('guide labels', 'label_dim=3'),
    ('class out of range', 'out of range'),
    ('seeds malformed', "'--seeds'"),
    ('seeds reversed', 'empty range'),
    ('unknown preset', 'unknown generate preset'),
    ('unreachable url', '127.0.0.1'),
    ('missing file', 'nothing.pkl'),
    ('bad interval', "'--guidance-interval'"),
    ('bad weights', "'--guide-weights'"),
    ('both interval flags', '--guidance-interval or --guidance-interval-steps, not both'),
    ('interval steps reversed', "'--guidance-interval-steps'"),
    ('interval steps outside schedule', 'outside the schedule of 4 steps (0..3)'),
    ('interval steps malformed', "'--guidance-interval-steps'"),
    ('balanced unconditional', 'balanced labels need a conditional network'),
    ('labels-out unconditional', '--labels-out'),
    ('class and balanced', 'give --class or --labels balanced, not both'),
    ('labels unknown', "'--labels'"),
    ('sigma_max inf', "'--sigma_max'"),
    ('sigma_max nan', "'--sigma_max'"),
    ('sigma_max huge', "'--sigma_max'"),
    ('sigma_min above sigma_max', 'exceeds sigma_max'),
    ('rho tiny', "'--rho'"),
    ('rho 1e-300', "'--rho'"),
    ('steps negative', "'--steps'"),
    ('steps zero', "'--steps'"),
    ('batch zero', "'--batch'"),
    ('churn negative', "'--S_churn'"),
    ('S_noise nan', "'--S_noise'"),
    ('S_max nan', "'--S_max'"),
    ('guidance inf', "'--guidance'"),
    ('guidance nan', "'--guidance'"),
    ('guide weight nan', "'--guide-weights'"),
    ('interval nan', "'--guidance-interval'"),
    ('class negative', "'--class'"),
    ('outdir is a file', '--outdir'),
    ('grid is a folder', '--grid'),
    ('labels-out under a file', '--labels-out'),
    ('device unavailable', '--device'),
    ('device malformed', '--device'),
    ('grid of huge seeds', "'--grid'"),
    ('non-finite network output', 'non-finite values'),
])
def test_bad_input_gives_one_line_error_and_no_files(nets, tmp_path, case, message):
    out = tmp_path / 'out'
    base = ['--net', nets['main'], '--outdir', out, '--steps', 2, '--seeds', '0-1']
    args = {
        'guidance without gnet': base + ['--guidance', 2],
        'guide resolution': base + ['--gnet', nets['res16'], '--guidance', 2],
        'guide channels': base + ['--gnet', nets['rgba'], '--guidance', 2],
        'guide labels': base + ['--gnet', nets['labels3'], '--guidance', 2],
        'class out of range': base + ['--class', 4],
        'seeds malformed': base + ['--seeds', '1-x'],
        'seeds reversed': base + ['--seeds', '5-2'],
        'unknown preset': ['--preset', 'edm2-img512-nope', '--outdir', out],
        'unreachable url': ['--net', f'http://127.0.0.1:{_closed_port()}/net.pkl', '--outdir', out],
        'missing file': ['--net', tmp_path / 'nothing.pkl', '--outdir', out],
        'bad interval': base + ['--gnet', nets['guide'], '--guidance', 2, '--guidance-interval', '2,1'],
        'bad weights': base + ['--gnet', nets['guide'], '--gnet', nets['uncond'], '--guidance', 2,
                               '--guide-weights', '0.5'],
        'both interval flags': base + ['--gnet', nets['guide'], '--guidance', 2, '--guidance-interval', '0.1,5',
                                       '--guidance-interval-steps', '1,2'],
        'interval steps reversed': base + ['--gnet', nets['guide'], '--guidance', 2, '--guidance-interval-steps', '3,1'],
        'interval steps outside schedule': base + ['--gnet', nets['guide'], '--guidance', 2, '--steps', 4,
                                                   '--guidance-interval-steps', '2,4'],
        'interval steps malformed': base + ['--guidance-interval-steps', '1.5,3'],
        'balanced unconditional': ['--net', nets['uncond'], '--outdir', out, '--steps', 2, '--labels', 'balanced'],
        'labels-out unconditional': ['--net', nets['uncond'], '--outdir', out, '--steps', 2, '--labels-out',
                                     tmp_path / 'labels.json'],
        'class and balanced': base + ['--class', 1, '--labels', 'balanced'],
        'labels unknown': base + ['--labels', 'uniform'],
        'sigma_max inf': base + ['--sigma_max', 'inf'],
        'sigma_max nan': base + ['--sigma_max', 'nan'],
        'sigma_max huge': base + ['--sigma_max', '1e39'],
        'sigma_min above sigma_max': base + ['--sigma_min', 5, '--sigma_max', 1],
        'rho tiny': base + ['--rho', '0.001'],
        'rho 1e-300': base + ['--rho', '1e-300'],
        'steps negative': base + ['--steps', -3],
        'steps zero': base + ['--steps', 0],
        'batch zero': base + ['--batch', 0],
        'churn negative': base + ['--S_churn', -1],
        'S_noise nan': base + ['--S_noise', 'nan'],
        'S_max nan': base + ['--S_max', 'nan'],
        'guidance inf': base + ['--gnet', nets['guide'], '--guidance', 'inf'],
        'guidance nan': base + ['--gnet', nets['guide'], '--guidance', 'nan'],
        'guide weight nan': base + ['--gnet', nets['guide'], '--gnet', nets['uncond'], '--guidance', 2,
                                    '--guide-weights', '0.5,nan'],
        'interval nan': base + ['--gnet', nets['guide'], '--guidance', 2, '--guidance-interval', '0.1,nan'],
        'class negative': base + ['--class', -1],
        'outdir is a file': ['--net', nets['main'], '--outdir', nets['main'], '--steps', 2],
        'grid is a folder': base + ['--grid', tmp_path],
        'labels-out under a file': base + ['--labels-out', pathlib.Path(nets['main']) / 'labels.json'],
        'device unavailable': base + ['--device', 'cuda:7'],
        'device malformed': base + ['--device', 'gpu-please'],
        'grid of huge seeds': ['--net', nets['main'], '--grid', tmp_path / 'g.png', '--seeds', '0-999999999999'],
        'non-finite network output': ['--net', nets['nan'], '--outdir', out, '--steps', 2, '--seeds', '0-1'],
    }[case]
    result = run_cli(*args)
    assert result.exit_code in (1, 2), result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)
    error_lines = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(error_lines) == 1 and message in error_lines[0], result.output
    assert 'Traceback' not in result.output
    assert pngs(out) == [] and not (tmp_path / 'labels.json').exists() and not (tmp_path / 'g.png').exists()


# ----------------------------------------------------------------------------------------------------
# Output files.

def test_cli_writes_the_library_images(nets, tmp_path):
    out = tmp_path / 'out'
    result = run_cli('--net', nets['main'], '--gnet', nets['guide'], '--gnet', nets['uncond'], '--guidance', 2.5,
                     '--guide-weights', '0.25,0.75', '--guidance-interval', '0.1,5', '--seeds', '3-7', '--batch', 2,
                     '--steps', 4, '--S_churn', 2, '--S_max', 10, '--outdir', out, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    assert pngs(out) == [f'{s:06d}.png' for s in range(3, 8)]
    expected = library_images(nets, range(3, 8), gnets=['guide', 'uncond'], guidance=2.5, guide_weights=[0.25, 0.75],
                              interval=sampling.SigmaInterval(0.1, 5), batch_size=2, num_steps=4, S_churn=2, S_max=10)
    for s in range(3, 8):
        assert torch.equal(read_png(out / f'{s:06d}.png'), expected[s])
    assert not [p for p in os.listdir(out) if not p.endswith('.png')]  # no temporary files left


def test_euler_solver_flag_writes_the_library_euler_images(nets, tmp_path):
    out = tmp_path / 'out'
    result = run_cli('--net', nets['main'], '--gnet', nets['guide'], '--guidance', 2, '--seeds', '0-1', '--steps', 5,
                     '--solver', 'euler', '--outdir', out, '--device', 'cpu')
    assert result.exit_code == 0, result.output
    euler = library_images(nets, range(2), gnets=['guide'], guidance=2, num_steps=5, solver='euler')
    heun = library_images(nets, range(2), gnets=['guide'], guidance=2, num_steps=5)
    for s in range(2):
        assert torch.equal(read_png(out / f'{s:06d}.png'), euler[s]) and not torch.equal(euler[s], heun[s])


def test_subdirs_grid_and_class(nets, tmp_path):
    out, grid = tmp_path / 'out', tmp_path / 'sheet' / 'grid.png'
    result = run_cli('--net', nets['main'], '--seeds', '998-1002', '--subdirs', '--class', 3, '--steps', 2,
                     '--outdir', out, '--grid', grid)
    assert result.exit_code == 0, result.output
    assert pngs(out) == ['000000/000998.png', '000000/000999.png', '001000/001000.png', '001000/001001.png',
                         '001000/001002.png']
    expected = library_images(nets, range(998, 1003), classes=3, num_steps=2)
    sheet = np.array(PIL.Image.open(grid))
    assert sheet.shape == (2 * 8, 3 * 8, 3)  # 5 images: 3 columns, 2 rows
    for i, s in enumerate(range(998, 1003)):
        r, c = divmod(i, 3)
        tile = torch.from_numpy(sheet[r * 8:(r + 1) * 8, c * 8:(c + 1) * 8]).permute(2, 0, 1)
        assert torch.equal(tile, expected[s])
        assert torch.equal(read_png(out / f'{s // 1000 * 1000:06d}' / f'{s:06d}.png'), expected[s])
    # A grid alone: the closing line says what was written (it said "0 images written").
    result = run_cli('--net', nets['main'], '--seeds', '0-1', '--steps', 2, '--grid', tmp_path / 'alone.png')
    assert result.exit_code == 0 and f'Done: wrote a grid of 2 images to "{tmp_path / "alone.png"}".' in result.output


def test_skip_existing_resumes(nets, tmp_path):
    out = tmp_path / 'out'
    args = ['--net', nets['main'], '--seeds', '0-5', '--batch', 2, '--steps', 2, '--outdir', out]
    assert run_cli(*args).exit_code == 0
    first = {p: (out / p).read_bytes() for p in pngs(out)}
    (out / '000003.png').unlink()
    shutil.copy(out / '000000.png', out / '000005.png')  # an existing file must be left alone
    result = run_cli(*args, '--skip-existing')
    assert result.exit_code == 0, result.output
    assert f'Done: wrote 1 images to "{out}"' in result.output
    assert (out / '000003.png').read_bytes() == first['000003.png']
    assert (out / '000005.png').read_bytes() == first['000000.png']


def test_preset_values_are_overridden_by_flags(nets, tmp_path, monkeypatch):
    table = {'tiny': dict(net=nets['main'], gnet=str(tmp_path / 'absent-guide.pkl'), guidance=2.0)}
    monkeypatch.setattr(presets, 'get', lambda name, key: dict(table[key]))
    common = ['--preset', 'tiny', '--seeds', '0-2', '--steps', 3]
    # The preset's guide does not exist: loading it is an error naming the flag ...
    result = run_cli(*common, '--outdir', tmp_path / 'a')
    assert result.exit_code == 1 and '--gnet' in result.output and 'absent-guide.pkl' in result.output
    # ... --guidance 1 overrides the preset, so no guide is loaded at all ...
    result = run_cli(*common, '--guidance', 1, '--outdir', tmp_path / 'b')
    assert result.exit_code == 0, result.output
    unguided = library_images(nets, range(3), num_steps=3)
    assert all(torch.equal(read_png(tmp_path / 'b' / f'{s:06d}.png'), unguided[s]) for s in range(3))
    # ... and an explicit --gnet replaces the preset's, keeping the preset's guidance 2.
    result = run_cli(*common, '--gnet', nets['guide'], '--outdir', tmp_path / 'c')
    assert result.exit_code == 0, result.output
    guided = library_images(nets, range(3), gnets=['guide'], guidance=2.0, num_steps=3)
    assert all(torch.equal(read_png(tmp_path / 'c' / f'{s:06d}.png'), guided[s]) for s in range(3))


# ----------------------------------------------------------------------------------------------------
# End to end: torchrun, and parity with the published release.

def _env():
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=str(REPO))
    env.pop('WORLD_SIZE', None)
    return env


@pytest.mark.slow
def test_torchrun_two_processes_write_the_same_files(nets, tmp_path):
    # 8 seeds, batch 2: one process cuts 4 chunks of 2, two processes 4 chunks of 2 (2 each), so the
    # batches (and hence the float arithmetic) are the same and the files must be byte-identical.
    args = ['--net', nets['main'], '--gnet', nets['guide'], '--guidance', 2, '--seeds', '0-7', '--batch', 2,
            '--steps', 3, '--S_churn', 1, '--device', 'cpu']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    subprocess.run([sys.executable, str(REPO / 'generate_images.py'), *map(str, args), '--outdir', str(tmp_path / 'one'),
                    '--grid', str(tmp_path / 'one.png')], check=True, env=_env(), capture_output=True, timeout=300)
    proc = subprocess.run([*torchrun, str(REPO / 'generate_images.py'), *map(str, args), '--outdir',
                           str(tmp_path / 'two'), '--grid', str(tmp_path / 'two.png')], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = pngs(tmp_path / 'one')
    assert files == [f'{s:06d}.png' for s in range(8)] and pngs(tmp_path / 'two') == files
    for f in files:
        assert (tmp_path / 'one' / f).read_bytes() == (tmp_path / 'two' / f).read_bytes(), f
    assert (tmp_path / 'one.png').read_bytes() == (tmp_path / 'two.png').read_bytes()


@pytest.mark.slow
def test_torchrun_balanced_labels_agree_with_one_process(nets, tmp_path):
    # Balanced classes depend on the seed's position only: one process with batch 3, two processes with
    # batch 2, and a resumed two-process run with --skip-existing write the same labels file.
    args = ['--net', nets['main'], '--seeds', '0-10', '--steps', 2, '--labels', 'balanced', '--device', 'cpu']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    script = str(REPO / 'generate_images.py')
    runs = [([sys.executable, script], ['--batch', 3, '--outdir', tmp_path / 'one', '--labels-out', tmp_path / '1.json']),
            (torchrun + [script], ['--batch', 2, '--outdir', tmp_path / 'two', '--labels-out', tmp_path / '2.json'])]
    for launcher, extra in runs:
        proc = subprocess.run([*launcher, *map(str, args + extra)], env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    for s in (1, 6, 9):
        (tmp_path / 'two' / f'{s:06d}.png').unlink()
    proc = subprocess.run([*torchrun, script, *map(str, args + ['--batch', 2, '--outdir', tmp_path / 'two',
                                                              '--skip-existing', '--labels-out', tmp_path / '3.json'])],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = _labels(tmp_path / '1.json')
    assert [c for _, c in one] == [p % 4 for p in range(11)]
    assert _labels(tmp_path / '2.json') == one and _labels(tmp_path / '3.json') == one
    assert pngs(tmp_path / 'two') == pngs(tmp_path / 'one') == [f'{s:06d}.png' for s in range(11)]


@pytest.mark.slow
@pytest.mark.parametrize('case, flags', [
    ('guided_w2', ['--guidance', 2]),
    ('unguided', []),
    ('guided_w2_churn10', ['--guidance', 2, '--S_churn', 10, '--S_min', 0.05, '--S_max', 50]),
])
def test_cli_parity_with_published_release(official, tmp_path, case, flags):
    ref = torch.load(official('generate-rgb16.pt'))
    result = run_cli('--net', official('main-rgb16.pkl'), '--gnet', official('guide-rgb16.pkl'), *flags,
                     '--steps', 8, '--batch', 3, '--seeds', '0-7', '--outdir', tmp_path)
    assert result.exit_code == 0, result.output
    images = torch.stack([read_png(tmp_path / f'{s:06d}.png') for s in ref['seeds']])
    diff = (images.int() - ref[case].int()).abs()
    identical = (diff == 0).float().mean().item()
    assert diff.max().item() <= 1 and identical >= 0.999, \
        f'{case}: max difference {diff.max().item()} levels, {identical:.2%} identical' + PARITY_HINT


# ----------------------------------------------------------------------------------------------------
# Guidance interval flags and class-balanced labels.

def test_interval_flags_select_the_same_steps_at_32_steps(nets, tmp_path):
    common = ['--net', nets['main'], '--gnet', nets['uncond'], '--guidance', 2, '--seeds', '0-2', '--steps', 32]
    for name, flags in (('sigma', ['--guidance-interval', '0.19,1.61']), ('steps', ['--guidance-interval-steps', '17,22']),
                        ('plain', []), ('none', ['--guidance', 1])):
        result = run_cli(*common, *flags, '--outdir', tmp_path / name)
        assert result.exit_code == 0, result.output
    files = pngs(tmp_path / 'sigma')
    assert files == pngs(tmp_path / 'steps') == [f'{s:06d}.png' for s in range(3)]
    read = lambda name: [(tmp_path / name / f).read_bytes() for f in files]
    assert read('sigma') == read('steps')
    assert read('sigma') != read('plain') and read('sigma') != read('none')  # a real, partial interval
    expected = library_images(nets, range(3), gnets=['uncond'], guidance=2.0, num_steps=32,
                              interval=sampling.StepInterval(17, 22))
    assert all(torch.equal(read_png(tmp_path / 'steps' / f'{s:06d}.png'), expected[s]) for s in range(3))


def test_preset_interval_steps_and_explicit_override(nets, tmp_path, monkeypatch):
    table = {'tiny': dict(net=nets['main'], gnet=nets['uncond'], guidance=2.0, guidance_interval_steps=[1, 2])}
    monkeypatch.setattr(presets, 'get', lambda name, key: dict(table[key]))
    assert run_cli('--preset', 'tiny', '--seeds', '0-1', '--steps', 4, '--outdir', tmp_path / 'a').exit_code == 0
    expected = library_images(nets, range(2), gnets=['uncond'], guidance=2.0, num_steps=4,
                              interval=sampling.StepInterval(1, 2))
    assert all(torch.equal(read_png(tmp_path / 'a' / f'{s:06d}.png'), expected[s]) for s in range(2))
    # An explicit --guidance-interval replaces the preset's interval of steps (no "both" error).
    result = run_cli('--preset', 'tiny', '--seeds', '0-1', '--steps', 4, '--guidance-interval', '0,inf',
                     '--outdir', tmp_path / 'b')
    assert result.exit_code == 0, result.output
    plain = library_images(nets, range(2), gnets=['uncond'], guidance=2.0, num_steps=4)
    assert all(torch.equal(read_png(tmp_path / 'b' / f'{s:06d}.png'), plain[s]) for s in range(2))
    # The preset's steps are checked against --steps before any work.
    result = run_cli('--preset', 'tiny', '--seeds', '0-1', '--steps', 2, '--outdir', tmp_path / 'c')
    assert result.exit_code == 2 and 'outside the schedule of 2 steps' in result.output and pngs(tmp_path / 'c') == []


def _labels(path):
    return json.loads(pathlib.Path(path).read_text())['labels']


def test_balanced_labels_out_whatever_batch_and_skip(nets, tmp_path):
    common = ['--net', nets['main'], '--seeds', '10-20', '--steps', 2, '--labels', 'balanced', '--subdirs']
    result = run_cli(*common, '--batch', 3, '--outdir', tmp_path / 'a', '--labels-out', tmp_path / 'a.json')
    assert result.exit_code == 0, result.output
    a = _labels(tmp_path / 'a.json')
    assert [f for f, _ in a] == [f'000000/{s:06d}.png' for s in range(10, 21)]
    assert [c for _, c in a] == [p % 4 for p in range(11)]  # 4 classes: 3, 3, 3 and 2 images
    expected = library_images(nets, range(10, 21), num_steps=2, classes='balanced', batch_size=3)
    assert all(torch.equal(read_png(tmp_path / 'a' / '000000' / f'{s:06d}.png'), expected[s]) for s in range(10, 21))
    # Another batch size; and a resumed run that skips most files: the same labels file.
    result = run_cli(*common, '--batch', 5, '--outdir', tmp_path / 'b', '--labels-out', tmp_path / 'b.json')
    assert result.exit_code == 0, result.output
    assert _labels(tmp_path / 'b.json') == a
    for s in (12, 13, 17):
        (tmp_path / 'a' / '000000' / f'{s:06d}.png').unlink()
    result = run_cli(*common, '--batch', 3, '--outdir', tmp_path / 'a', '--skip-existing',
                     '--labels-out', tmp_path / 'a2.json')
    assert result.exit_code == 0 and f'Done: wrote 3 images to "{tmp_path / "a"}"' in result.output, result.output
    assert _labels(tmp_path / 'a2.json') == a
    # The default rule is the published one, and its labels file lists the drawn classes.
    result = run_cli('--net', nets['main'], '--seeds', '10-20', '--steps', 2, '--outdir', tmp_path / 'c',
                     '--labels-out', tmp_path / 'c.json')
    assert result.exit_code == 0, result.output
    import edm2
    net = edm2.load_snapshot(nets['main'])[0]
    drawn = torch.cat([b.labels for b in generation.generate(net, range(10, 21), skip=lambda s: True)])
    assert [c for _, c in _labels(tmp_path / 'c.json')] == drawn.tolist()
