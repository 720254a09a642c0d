"""Bounds on every size flag: a count whose items cannot fit in the memory available is refused before any
work, in one line naming the flag, where the allocation is known: once every flag is parsed for a cost the
flags fix (edm2.commands.cli.Int's item_bytes, Command), once the input is open for a count the input caps
(edm2.commands.cli.check_memory); a value whose cost does not depend on it is never refused; the available
memory honours a cgroup limit. Text that is not an integer is one line too."""

import pathlib

import pytest
from click.testing import CliRunner
from helpers import make_images, sweep_args, write_run

from edm2.commands import calculate_metrics
from edm2.commands import dataset_tool
from edm2.commands import generate_images
from edm2.commands import reconstruct_phema
from edm2.commands import toy_example
from edm2.commands import train_edm2
from edm2 import generation, limits, toy
from edm2.checkpoint import load_network
from edm2.metrics import dataset_features
from edm2.sweep import run as sweep_lib
from edm2.networks import build_network

pytestmark = pytest.mark.usefixtures('one_thread')
HUGE = str(10 ** 15)


def _refused(result, flag, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert 'Traceback' not in result.output and lines[-1].startswith('Error:'), result.output
    for fragment in (flag, *fragments):
        assert fragment in lines[-1], lines[-1]


@pytest.fixture
def no_work(monkeypatch):
    """The steps that would start work fail the test."""
    def work(*args, **kwargs):
        raise AssertionError('work started')
    for module, name in [(toy, 'train'), (toy_example, 'run_eval'), (dataset_features, 'open_dataset'),
                         (calculate_metrics, '_load_detectors'), (dataset_tool, '_Source'),
                         (generation, 'generate'), (reconstruct_phema, 'write_batch')]:
        monkeypatch.setattr(module, name, work)


def _memory(monkeypatch, free):
    monkeypatch.setattr(limits, "available_memory", lambda device=None: free, raising=False)


CASES = [  # (command, arguments, flag): HUGE items of that flag cannot fit anywhere
    (toy_example.cli, ['train', '--outdir', 'o', '--batch', '200000000'], '--batch'),
    (toy_example.cli, ['train', '--outdir', 'o', '--batch', HUGE], '--batch'),
    (toy_example.cli, ['train', '--outdir', 'o', '--width', '1000000'], '--width'),
    (toy_example.cli, ['train', '--outdir', 'o', '--layers', '10000000'], '--layers'),
    (toy_example.cli, ['train', '--outdir', 'o', '--iterations', HUGE], '--iterations'),
    (toy_example.cli, ['train', '--outdir', 'o', '--width', '32', '--batch', HUGE], '--batch'),
    (toy_example.cli, ['eval', '--ideal', '--out', 'e.json', '--num', HUGE], '--num'),
    (toy_example.cli, ['eval', '--ideal', '--out', 'e.json', '--steps', HUGE], '--steps'),
    (toy_example.cli, ['plot', '--ideal', '--out', 'p.png', '--dpi', '10000000'], '--dpi'),
    (toy_example.cli, ['demo', '--batch', HUGE], '--batch'),
    (toy_example.cli, ['demo', '--num', HUGE], '--num'),
    (toy_example.cli, ['demo', '--main-iterations', HUGE], '--main-iterations'),
    (calculate_metrics.cli, ['calc', '--images', 'd', '--ref', 'r.pkl', '--num', HUGE], '--num'),
    (calculate_metrics.cli, ['calc', '--images', 'd', '--ref', 'r.pkl', '--num', '1000000', '--repeats', HUGE],
     '--repeats'),
    (calculate_metrics.cli, ['gen', '--net', 'n', '--ref', 'r.pkl', '--num', HUGE], '--num'),
    (calculate_metrics.cli, ['calc', '--images', 'd', '--ref', 'r.pkl', '--workers', HUGE], '--workers'),
    (calculate_metrics.cli, ['sweep', '--net', 'n', '--gnet', 'g', '--guidance', '2', '--ref', 'r', '--outdir', 'o',
                             '--num', HUGE], '--num'),
    (calculate_metrics.cli, ['sweep', '--net', 'n', '--gnet', 'g', '--guidance', '2', '--ref', 'r', '--outdir', 'o',
                             '--steps', HUGE], '--steps'),
]


@pytest.mark.parametrize('command, args, flag', CASES, ids=[f'{c[1][0]}{c[2]}' for c in CASES])
def test_counts_beyond_memory_are_refused_before_work(command, args, flag, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _refused(CliRunner().invoke(command, args), flag)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('command, args, flag', CASES[:1] + CASES[6:7] + CASES[12:13] + CASES[17:18])
def test_non_integer_text_is_one_line(command, args, flag, no_work, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for text in ['1e11', '12.5', '9' * 5000, '0x10']:
        _refused(CliRunner().invoke(command, args[:-1] + [text]), flag, 'integer')


def test_the_bound_follows_the_available_memory(no_work, tmp_path, monkeypatch):
    _memory(monkeypatch, 10 ** 8)
    per_sample = toy.training_bytes(64, 4, 1) - toy.training_bytes(64, 4, 0)
    fits = (10 ** 8 - toy.training_bytes(64, 4, 0)) // per_sample
    args = ['train', '--outdir', str(tmp_path / 'o'), '--iterations', '1', '--batch']
    _refused(CliRunner().invoke(toy_example.cli, args + [str(fits + 1)]), '--batch', '100.0 MB is available')
    with pytest.raises(AssertionError, match='work started'):  # one sample fewer: training starts
        CliRunner().invoke(toy_example.cli, args + [str(fits)], catch_exceptions=False)
    assert generation.image_bytes(build_network(dict(img_resolution=8, img_channels=3, label_dim=0,
                                                     model_channels=8, channel_mult=[1], num_blocks=1,
                                                     attn_resolutions=[]))) == 4 * 64 * (8 * 3 + 4 * 8) + 192


def test_sizes_known_once_inputs_are_open(nets, tmp_path, monkeypatch):
    _memory(monkeypatch, 10 ** 6)
    # generate_images.py --batch: the network's images (8x8, 8 channels: 14.5 kB each)
    result = CliRunner().invoke(generate_images.main, ['--net', nets['main'], '--outdir', str(tmp_path / 'g'),
                                                       '--batch', '100', '--seeds', '0-199', '--steps', '2'])
    _refused(result, '--batch', 'per image')
    assert not (tmp_path / 'g').exists()
    # reconstruct_phema.py --batch: networks held at once (a snapshot file of the tiny run is 13 kB)
    run = write_run(tmp_path / 'run', 0, 4)
    _memory(monkeypatch, 30_000)
    result = CliRunner().invoke(reconstruct_phema.main, ['--indir', str(run), '--outdir', str(tmp_path / 'p'),
                                                         '--outstd', '0.06,0.07,0.08', '--batch', '3'])
    _refused(result, '--batch', 'per network')
    assert not (tmp_path / 'p').exists()
    # train_edm2.py --batch-gpu: images of one pass
    data = make_images(tmp_path / 'data')
    _memory(monkeypatch, 10 ** 7)
    result = CliRunner().invoke(train_edm2.main, [
        '--outdir', str(tmp_path / 't'), '--data', str(data), '--cond', '0', '--duration', '64', '--batch', '4096',
        '--channels', '8', '--channel-mult', '1', '--num-blocks', '1', '--attn-res', '', '--device', 'cpu'])
    assert result.exit_code != 0 and '--batch: 4096 needs about' in result.output.splitlines()[-1], result.output
    assert not (tmp_path / 't').exists()


def test_sweep_networks_held_at_once_are_checked_before_any_cell(sweep_assets, tmp_path, monkeypatch):
    """--phema-batch / --gnet-batch: the main and guide networks held at once (plus one input snapshot of
    each axis) must fit; the sweep's grid has 2 main and 2 guide EMA lengths."""
    def params(folder):
        return 4 * sum(p.numel() for p in load_network(sorted(folder.iterdir())[0]).parameters())
    main, guide = params(pathlib.Path(sweep_assets['main'])), params(pathlib.Path(sweep_assets['guide']))

    def work(*args, **kwargs):
        raise AssertionError('work started')
    monkeypatch.setattr(sweep_lib, 'run_sweep', work)
    preflight, real_memory = sweep_lib.preflight, limits.available_memory
    monkeypatch.setattr(limits, "available_memory", lambda device=None: limit.get('free') or real_memory(device))

    def preflight_with_little_memory(*args):  # the flags' own checks, before it, see the real memory
        limit['free'] = 3 * main + 3 * guide - 1  # both main networks, both guides, one input of each
        try:
            preflight(*args)
        finally:
            limit.clear()
    limit = {}
    monkeypatch.setattr(sweep_lib, 'preflight', preflight_with_little_memory)
    result = CliRunner().invoke(calculate_metrics.cli, sweep_args(sweep_assets, tmp_path / 'o'))
    assert result.exit_code != 0 and 'Traceback' not in result.output, result.output
    last = result.output.splitlines()[-1]
    assert last.startswith('Error:') and '--phema-batch 8' in last and 'is available' in last, last
    assert not (tmp_path / 'o' / 'cells.jsonl').exists()
    with pytest.raises(AssertionError, match='work started'):  # one main network at a time fits
        CliRunner().invoke(calculate_metrics.cli, sweep_args(sweep_assets, tmp_path / 'o', ['--phema-batch', '1']),
                           catch_exceptions=False)


def test_counts_capped_by_the_input_are_checked_once_it_is_open(tmp_path, monkeypatch):
    """--max-images, --keep-num, --ref-images and a batch cost at most what the input holds: a huge value for a
    small input is not refused (it was priced as if that many images existed); a batch that does not fit, with
    the images there are, is refused in one line before any work."""
    data = make_images(tmp_path / 'data', n=3, res=8)
    result = CliRunner().invoke(dataset_tool.cli, ['convert', '--source', str(data), '--dest', str(tmp_path / 'd.zip'),
                                                   '--max-images', '1000000000', '--workers', '1'])
    assert result.exit_code == 0 and 'Wrote 3 images' in result.output, result.output

    def work(*args, **kwargs):
        raise AssertionError('work started')
    monkeypatch.setattr(calculate_metrics, '_load_detectors', work)
    for extra in (['--keep-features', '--keep-num', HUGE, '--batch', HUGE], ['--protocol', 'adm', '--ref-images', HUGE]):
        with pytest.raises(AssertionError, match='work started'):
            CliRunner().invoke(calculate_metrics.cli, ['ref', '--data', str(data), '--dest', str(tmp_path / 'r.pkl'),
                                                       *extra], catch_exceptions=False)
    _memory(monkeypatch, 2 * calculate_metrics.DETECTOR_IMAGE_BYTES)
    result = CliRunner().invoke(calculate_metrics.cli, ['ref', '--data', str(data), '--dest', str(tmp_path / 'r.pkl'),
                                                        '--batch', '64', '--workers', '0'])
    _refused(result, '--batch', '3 needs about', 'per image')  # the 3 images there are, not 64
    _memory(monkeypatch, 3 * 8 * 8 * dataset_tool.VAE_PIXEL_BYTES - 1)
    result = CliRunner().invoke(dataset_tool.cli, ['encode', '--source', str(tmp_path / 'd.zip'),
                                                   '--dest', str(tmp_path / 'e.zip'), '--batch', '60000'])
    _refused(result, '--batch', '3 needs about')
    assert not (tmp_path / 'e.zip').exists() and not (tmp_path / 'r.pkl').exists()


def test_no_value_is_refused_while_it_is_parsed_from_the_free_memory(monkeypatch):
    """Parsing checks the fixed bounds only; the memory check runs once every flag is known."""
    _memory(monkeypatch, 1)
    from edm2.commands.cli import Int
    assert Int(1, item_bytes=10 ** 9).convert('1000', None, None) == 1000
    with pytest.raises(Exception, match=r'must lie in \[1, 10\]'):
        Int(1, 10, item_bytes=1).convert('11', None, None)


def test_the_available_memory_honours_a_cgroup_limit(tmp_path):
    """cgroup v2 (the process's own group and the groups above it) and v1; 'max' and v1's huge number mean none."""
    root = tmp_path / 'cg'
    (root / 'user' / 'job').mkdir(parents=True)
    proc = tmp_path / 'cgroup'
    proc.write_text('0::/user/job\n')
    assert limits.cgroup_memory_room(str(root), str(proc)) is None
    (root / 'user' / 'job' / 'memory.max').write_text('max\n')
    (root / 'user' / 'memory.max').write_text(f'{8 << 30}\n')
    (root / 'user' / 'memory.current').write_text(f'{3 << 30}\n')
    assert limits.cgroup_memory_room(str(root), str(proc)) == 5 << 30
    (root / 'user' / 'job' / 'memory.max').write_text(f'{2 << 30}\n')
    (root / 'user' / 'job' / 'memory.current').write_text(f'{1 << 30}\n')
    assert limits.cgroup_memory_room(str(root), str(proc)) == 1 << 30
    v1 = tmp_path / 'v1'
    (v1 / 'memory' / 'docker' / 'abc').mkdir(parents=True)
    proc.write_text('4:memory:/docker/abc\n0::/\n')
    (v1 / 'memory' / 'docker' / 'abc' / 'memory.limit_in_bytes').write_text(f'{2 ** 63 - 4096}\n')
    assert limits.cgroup_memory_room(str(v1), str(proc)) is None
    (v1 / 'memory' / 'docker' / 'abc' / 'memory.limit_in_bytes').write_text(f'{4 << 30}\n')
    (v1 / 'memory' / 'docker' / 'abc' / 'memory.usage_in_bytes').write_text(f'{1 << 30}\n')
    assert limits.cgroup_memory_room(str(v1), str(proc)) == 3 << 30
