"""dataset_tool.py convert --workers: the same output as one process, bad images, no hang (edm2.worker_pool)."""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import PIL.Image
import psutil
import pytest
from click.testing import CliRunner

from edm2.commands import dataset_tool
from edm2.worker_pool import MAX_WORKERS_PER_CORE, WorkerError, ordered_map, usable_cores, worker_count

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args):
    return CliRunner().invoke(dataset_tool.cli, [str(a) for a in args], catch_exceptions=False)


def _mixed_folder(root, count, classes=3, seed=0):
    """`count` tiny images of mixed sizes, JPEG and PNG (greyscale, RGB, RGBA), in class folders."""
    rnd = np.random.RandomState(seed)
    for i in range(count):
        folder = root / f'class{i % classes}'
        folder.mkdir(parents=True, exist_ok=True)
        w, h = rnd.randint(8, 25, size=2)
        kind = i % 4
        channels = {0: 3, 1: 3, 2: 1, 3: 4}[kind]
        arr = rnd.randint(0, 256, (h, w, channels), dtype=np.uint8).squeeze()
        img = PIL.Image.fromarray(arr)
        if kind == 0:
            img.save(folder / f'{i:05d}.jpg', quality=90)
        else:
            img.save(folder / f'{i:05d}.png')
    return root


def _members(path):
    """[(name, bytes)] of a ZIP in archive order."""
    with zipfile.ZipFile(path) as z:
        return [(info.filename, z.read(info)) for info in z.infolist()]


def _convert(src, dest, workers, *args):
    r = _run('convert', '--source', src, '--dest', dest, '--workers', workers, *args)
    assert r.exit_code == 0, r.output
    return r.output


@pytest.mark.slow  # 2 000 images three times, about 5 s
def test_two_workers_write_the_same_archive(tmp_path):
    src = _mixed_folder(tmp_path / 'src', 2000)
    flags = ('--resolution', '16x16', '--transform', 'center-crop-dhariwal')
    out1 = _convert(src, tmp_path / 'one.zip', 1, *flags)
    out2 = _convert(src, tmp_path / 'two.zip', 2, *flags)
    one, two = _members(tmp_path / 'one.zip'), _members(tmp_path / 'two.zip')
    assert len(one) == 2001 and one == two  # names, order and bytes, dataset.json included
    assert 'Wrote 2000 images (16x16)' in out1 and 'Wrote 2000 images (16x16)' in out2
    labels = json.loads(dict(two)['dataset.json'])['labels']
    assert [c for _, c in labels[:6]] == [0, 0, 0, 0, 0, 0] and {c for _, c in labels} == {0, 1, 2}
    # --max-images picks the same images; a transform that skips images (too small for the wide strip) too.
    _convert(src, tmp_path / 'm1', 1, '--resolution', '16x8', '--transform', 'center-crop-wide', '--max-images', 700)
    _convert(src, tmp_path / 'm2.zip', 2, '--resolution', '16x8', '--transform', 'center-crop-wide',
             '--max-images', 700)
    folder = sorted(p.relative_to(tmp_path / 'm1').as_posix() for p in (tmp_path / 'm1').rglob('*') if p.is_file())
    m2 = _members(tmp_path / 'm2.zip')
    assert [n for n, _ in m2] == folder and len(folder) == 701
    assert all((tmp_path / 'm1' / n).read_bytes() == data for n, data in m2)


@pytest.mark.slow
def test_bad_image_in_a_worker_is_the_same_one_line_error(tmp_path):
    src = _mixed_folder(tmp_path / 'src', 40)
    (src / 'class1' / '00022.png').write_bytes(b'not a png')
    (src / 'class2' / '00032.jpg').write_bytes(b'')
    outputs = {}
    for workers in (1, 2):
        dest = tmp_path / f'out{workers}.zip'
        # A real process (spawned workers, a script as __main__), with a timeout: it must never hang.
        run = subprocess.run([sys.executable, 'dataset_tool.py', 'convert', '--source', str(src), '--dest', str(dest),
                              '--resolution', '8x8', '--transform', 'center-crop', '--workers', str(workers)],
                             cwd=REPO, capture_output=True, text=True, timeout=120)
        errors = [line for line in run.stderr.splitlines() if line.startswith('Error')]
        assert run.returncode == 1 and len(errors) == 1 and 'Traceback' not in run.stderr, run.stderr
        outputs[workers] = errors[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ['src']  # no output, no temporary
    assert outputs[1] == outputs[2] and '00022.png' in outputs[2] and '--skip-bad' in outputs[2]
    # --skip-bad: the same archive and the same count of skipped files.
    out = [_convert(src, tmp_path / f'skip{w}.zip', w, '--resolution', '8x8', '--transform', 'center-crop',
                    '--skip-bad') for w in (1, 2)]
    assert 'Wrote 38 images' in out[1] and 'skipped 2 unreadable files' in out[1]
    assert _members(tmp_path / 'skip1.zip') == _members(tmp_path / 'skip2.zip')
    # A ZIP source (members read by this process, converted by the workers): the same archive again.
    with zipfile.ZipFile(tmp_path / 'src.zip', 'w') as z:
        for path in sorted(src.rglob('*')):
            z.write(path, path.relative_to(src).as_posix())
    out = _convert(tmp_path / 'src.zip', tmp_path / 'skipz.zip', 2, '--resolution', '8x8', '--transform',
                   'center-crop', '--skip-bad')
    assert 'skipped 2 unreadable files' in out and _members(tmp_path / 'skipz.zip') == _members(tmp_path / 'skip1.zip')


def _square_or_fail(context, x):
    if x == context:
        raise ValueError(f'item {x} is bad')
    return x * x


@pytest.mark.slow
def test_ordered_map_keeps_order_bounds_reading_and_raises():
    read = []

    def items():
        for i in range(100):
            read.append(i)
            yield i

    with ordered_map(_square_or_fail, items(), workers=2, context=-1, in_flight=3, chunk=2) as results:
        got = []
        for r in results:
            got.append(r)
            # Never more than the window (2 workers x 3 chunks of 2) beyond the chunks being consumed.
            assert len(read) <= (-(-len(got) // 2) + 2 * 3) * 2
            if len(got) == 50:
                break  # leaving early stops the workers (the block returns)
    assert got == [i * i for i in range(50)]
    with pytest.raises(ValueError, match='item 7 is bad'):
        with ordered_map(_square_or_fail, range(20), workers=2, context=7) as results:
            assert [next(results) for _ in range(7)] == [i * i for i in range(7)]
            next(results)


class _Stubborn(Exception):
    """An exception whose class does not survive pickling (its constructor needs two arguments)."""

    def __init__(self, name, why):
        super().__init__(f'{name} is {why}')


def _raise_stubborn(context, x):
    if x == context:
        raise _Stubborn(f'item {x}', 'broken in an unusual way')
    return x


def _name_item(context, x):
    return f'file{x:03d}.png'


def test_an_exception_that_does_not_pickle_is_reported_as_text_naming_the_item():
    with pytest.raises(WorkerError) as e:
        with ordered_map(_raise_stubborn, range(12), workers=2, context=5, describe=_name_item) as results:
            list(results)
    assert str(e.value) == 'file005.png: _Stubborn: item 5 is broken in an unusual way'


def test_worker_count_is_priced():
    cores = usable_cores()
    assert worker_count(1024, 10) == 3 and worker_count(1024, 10 ** 6) == MAX_WORKERS_PER_CORE * cores
    assert worker_count(2, 10 ** 6) == min(2, MAX_WORKERS_PER_CORE * cores) and worker_count(8, 0) == 1


def test_convert_starts_no_more_workers_than_chunks(tmp_path, monkeypatch):
    src = _mixed_folder(tmp_path / 'src', 6)
    started = []
    real = dataset_tool.converted

    def recording(files, names, transform, size, workers):
        started.append(workers)
        return real(files, names, transform, size, 1)
    monkeypatch.setattr(dataset_tool, 'converted', recording)
    _convert(src, tmp_path / 'out.zip', 1024, '--resolution', '8x8', '--transform', 'center-crop')
    assert started == [2]  # 6 images: two chunks of 4


def _descendants_gone(procs, timeout):
    gone, alive = psutil.wait_procs(procs, timeout=timeout)
    return [f'{p.pid} {p.name()}' for p in alive]


@pytest.mark.slow
@pytest.mark.parametrize('sig', [signal.SIGKILL, signal.SIGTERM])
def test_no_worker_outlives_a_killed_parent(tmp_path, sig):
    """A real `dataset_tool.py convert --workers 2`, killed while its workers convert: within a few seconds
    no process it started (workers, multiprocessing's resource tracker) is left."""
    src = tmp_path / 'src'
    src.mkdir()
    buf = io.BytesIO()
    PIL.Image.fromarray(np.random.RandomState(0).randint(0, 256, (48, 48, 3), dtype=np.uint8)).save(buf, 'png')
    for i in range(6000):
        (src / f'{i:05d}.png').write_bytes(buf.getvalue())
    proc = subprocess.Popen([sys.executable, 'dataset_tool.py', 'convert', '--source', str(src), '--dest',
                             str(tmp_path / 'out.zip'), '--resolution', '16x16', '--transform', 'center-crop',
                             '--workers', '2'], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS='1'))
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.time() + 120
        children = []
        while time.time() < deadline and proc.poll() is None:  # until the workers are converting
            children = parent.children(recursive=True)
            temporaries = [p for p in tmp_path.iterdir() if p.name.startswith('.out.zip')]
            if len(children) >= 3 and temporaries and temporaries[0].stat().st_size > 100_000:
                break
            time.sleep(0.05)
        assert proc.poll() is None and len(children) >= 3, 'the conversion ended before it could be killed'
        os.kill(proc.pid, sig)
        proc.wait(timeout=30)
        assert _descendants_gone(children, timeout=10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
