"""Hostile and damaged dataset input: the reader (edm2.data) and dataset_tool.py convert each refuse it with
one line naming the file, or convert it deliberately, and never leave output under a final name.

Classes: pixel formats (16-bit, alpha, palette, CMYK, float), ZIP archives (duplicated, unsafe and oversized
members, bad CRC), damaged files (empty, truncated, garbage, bad NPY), labels (huge, negative, mistyped,
duplicated, missing, malformed JSON), and outputs (umask permissions, kill -9, bad destinations).
"""

import io
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
import zipfile
import zlib

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner

from edm2.commands import dataset_tool
from edm2 import data
from edm2.data import DatasetError, ImageFolderDataset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Helpers.

def _convert(*args):
    return CliRunner().invoke(dataset_tool.cli, ['convert', *[str(a) for a in args]], catch_exceptions=False)


def _encode(*args):
    return CliRunner().invoke(dataset_tool.cli, ['encode', *[str(a) for a in args]], catch_exceptions=False)


def _permissions(path):
    return stat.S_IMODE(path.stat().st_mode)


def _assert_refused(result, *fragments, status=1):
    """Exit status 1 (2 for a flag click refuses), exactly one 'Error:' line holding every fragment, no
    traceback."""
    assert result.exit_code == status, result.output
    errors = [line for line in result.output.splitlines() if line.startswith('Error')]
    assert len(errors) == 1, result.output
    assert 'Traceback' not in result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _refuses(path, *fragments, item=None):
    """The reader refuses `path` (at construction, or when reading `item`) with one line."""
    with pytest.raises(DatasetError) as info:
        ds = ImageFolderDataset(path)
        if item is not None:
            ds[item]
    message = str(info.value)
    assert '\n' not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _nothing_written(folder, keep):
    """Only the entries in `keep` are in `folder` (no output, no temporary)."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(keep)


def _png16(width, height, colour_type, samples):
    """A 16-bit PNG written by hand (Pillow cannot write 16-bit colour): samples uint16 [H, W, C]."""
    def chunk(kind, body):
        return struct.pack('>I', len(body)) + kind + body + struct.pack('>I', zlib.crc32(kind + body))
    rows = b''.join(b'\0' + row.astype('>u2').tobytes() for row in samples)
    header = struct.pack('>IIBBBBB', width, height, 16, colour_type, 0, 0, 0)
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header) + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b'')


def _good_png(path, value=100, size=8, mode='RGB'):
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.new(mode, (size, size), value).save(path)
    return path


def _zip(path, members):
    """ZIP with (name, bytes) members in order; duplicates allowed (zipfile warns, then writes them)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with zipfile.ZipFile(path, 'w') as z:
            for name, body in members:
                z.writestr(zipfile.ZipInfo(name), body)
    return path


def _png_bytes(value=100, size=8, mode='RGB'):
    img = PIL.Image.new(mode, (size, size), value)
    buf = io.BytesIO()
    img.save(buf, format='png')
    return buf.getvalue()


RAMP16 = (np.arange(64, dtype=np.int64).reshape(8, 8) * 1040 + 7).astype(np.uint16)  # 7 ... 65527


# ----------------------------------------------------------------------------------------------
# Pixel formats: converted deliberately or refused.

def _sixteen_bit_files(folder):
    folder.mkdir()
    PIL.Image.fromarray(RAMP16).save(folder / 'grey.png')  # mode I;16
    PIL.Image.frombytes('I;16B', (8, 8), RAMP16.astype('>u2').tobytes()).save(folder / 'big.tif')  # I;16B
    PIL.Image.fromarray(RAMP16).save(folder / 'pgm.ppm')  # opens as mode I
    rgb = np.stack([RAMP16, RAMP16[::-1], 65535 - RAMP16], axis=-1)
    (folder / 'colour.png').write_bytes(_png16(8, 8, 2, rgb))
    return rgb


def test_sixteen_bit_images_keep_their_high_byte(tmp_path):
    rgb = _sixteen_bit_files(tmp_path / 'src')
    modes = {name: PIL.Image.open(tmp_path / 'src' / name).mode for name in ('grey.png', 'big.tif', 'pgm.ppm')}
    assert modes == {'grey.png': 'I;16', 'big.tif': 'I;16B', 'pgm.ppm': 'I'}
    expect = (RAMP16 >> 8).astype(np.uint8)
    for name in modes:
        img = data.decode_image((tmp_path / 'src' / name).read_bytes(), name)
        assert img.mode == 'L' and np.array_equal(np.asarray(img), expect), name
    colour = np.asarray(data.decode_image((tmp_path / 'src' / 'colour.png').read_bytes(), 'colour.png'))
    assert np.array_equal(colour, rgb >> 8)  # Pillow's own 16-bit colour path agrees with ours
    assert (expect == 255).mean() < 0.05  # the old bug: 99.6 % of pixels at 255
    # A grey tRNS value (PNG transparency of 16-bit grey) becomes black like other transparent pixels.
    PIL.Image.fromarray(RAMP16).save(tmp_path / 'trns.png', transparency=int(RAMP16[2, 3]))
    keyed = expect.copy()
    keyed[2, 3] = 0
    assert np.array_equal(np.asarray(data.decode_image((tmp_path / 'trns.png').read_bytes(), 't')), keyed)
    # An 8-bit picture stored in 16 bits (v = 257 u) comes back exactly.
    u = np.arange(256, dtype=np.uint16).reshape(16, 16)
    PIL.Image.fromarray(u * 257).save(tmp_path / 'u.png')
    assert np.array_equal(np.asarray(data.decode_image((tmp_path / 'u.png').read_bytes(), 'u')), u)
    # The tool writes the same values (as RGB).
    r = _convert('--source', tmp_path / 'src', '--dest', tmp_path / 'out')
    assert r.exit_code == 0, r.output
    ds = ImageFolderDataset(tmp_path / 'out')
    assert len(ds) == 4 and all(np.array_equal(ds[i][0][0], expect if i != 1 else rgb[..., 0] >> 8)
                                for i in range(4))  # sorted: big.tif, colour.png, grey.png, pgm.ppm


def test_alpha_palette_and_other_modes_are_converted_deliberately(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[..., 3] = np.arange(64).reshape(8, 8) * 4  # alpha 0 ... 252
    cases = {}
    cases['rgba'] = (PIL.Image.fromarray(rgba, 'RGBA'), (rgba[..., :3].astype(int) * rgba[..., 3:] + 127) // 255)
    la = np.stack([np.full((8, 8), 90, np.uint8), rgba[..., 3]], -1)
    cases['la'] = (PIL.Image.fromarray(la, 'LA'), (90 * la[..., 1].astype(int) + 127) // 255)
    pal = PIL.Image.new('P', (8, 8), 1)
    pal.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info['transparency'] = 0  # colour 0 fully transparent, colour 1 opaque
    expect = np.tile(np.array([40, 50, 60]), (8, 8, 1))
    expect[0, 0] = 0
    cases['palette'] = (pal, expect)
    bilevel = PIL.Image.fromarray(np.eye(8, dtype=bool))
    cases['bilevel'] = (bilevel, np.eye(8, dtype=np.uint8) * 255)
    for name, (img, expected) in cases.items():
        got = data.to_8bit(img, name)
        assert got.mode in ('L', 'RGB') and np.array_equal(np.asarray(got), expected), name
    cmyk = PIL.Image.new('CMYK', (8, 8), (0, 255, 255, 0))  # pure red ink
    assert np.asarray(data.to_8bit(cmyk, 'cmyk'))[0, 0].tolist() == [255, 0, 0]
    opaque = PIL.Image.fromarray(np.dstack([rgba[..., :3], np.full((8, 8), 255, np.uint8)]), 'RGBA')
    assert np.array_equal(np.asarray(data.to_8bit(opaque, 'o')), rgba[..., :3])  # opaque: unchanged


def test_float_and_32_bit_pixels_are_refused_by_reader_and_tool(tmp_path):
    for name, img in [('float.tif', PIL.Image.fromarray(np.full((8, 8), 0.5, np.float32))),
                      ('int32.tif', PIL.Image.fromarray(np.full((8, 8), 70000, np.int32)))]:
        src = tmp_path / name.split('.')[0]
        _good_png(src / 'a.png')
        img.save(src / name)
        _refuses(src, name, 'no defined white level', item=1)
        before = sorted(p.name for p in tmp_path.iterdir())
        r = _convert('--source', src, '--dest', tmp_path / 'out.zip')
        _assert_refused(r, name, 'white level', '--skip-bad')
        _nothing_written(tmp_path, before)
        r = _convert('--source', src, '--dest', tmp_path / f'{name}.zip', '--skip-bad')
        assert r.exit_code == 0 and 'skipped 1' in r.output


# ----------------------------------------------------------------------------------------------
# ZIP archives.

@pytest.mark.parametrize('members, fragment', [
    ([('x/a.png', _png_bytes(1)), ('x/a.png', _png_bytes(2))], "'x/a.png' occurs more than once"),
    ([('a.png', _png_bytes()), ('dataset.json', b'{}'), ('dataset.json', b'{"labels": null}')],
     "'dataset.json' occurs more than once"),
    ([('a.png', _png_bytes()), ('../evil.png', _png_bytes())], "'../evil.png' has an unsafe path"),
    ([('a.png', _png_bytes()), ('/etc/evil.png', _png_bytes())], "'/etc/evil.png' has an unsafe path"),
    ([('a.png', _png_bytes()), ('x/../../evil.png', _png_bytes())], 'unsafe path'),
    ([('a.png', _png_bytes()), ('x//b.png', _png_bytes())], "'x//b.png' has an unsafe path"),
    ([('./a.png', _png_bytes())], "'./a.png' has an unsafe path"),
])
def test_zip_with_duplicated_or_unsafe_members_is_refused(tmp_path, members, fragment):
    archive = _zip(tmp_path / 'src.zip', members)
    _refuses(archive, 'src.zip', fragment)
    r = _convert('--source', archive, '--dest', tmp_path / 'out.zip')
    _assert_refused(r, 'src.zip', fragment)
    _nothing_written(tmp_path, ['src.zip'])


def test_zip_damage_and_clutter(tmp_path, monkeypatch):
    # A flipped byte in a stored member: the CRC check names the member.
    good = _png_bytes(7)
    archive = _zip(tmp_path / 'crc.zip', [('a.png', _png_bytes()), ('b.png', good)])
    raw = bytearray(archive.read_bytes())
    at = raw.rindex(good[-20:])
    raw[at] ^= 0xFF
    archive.write_bytes(bytes(raw))
    _refuses(archive, 'crc.zip:b.png', 'CRC', item=1)
    _assert_refused(_convert('--source', archive, '--dest', tmp_path / 'o1.zip'), 'crc.zip:b.png', 'CRC')
    # A truncated archive is not mistaken for an empty dataset.
    (tmp_path / 'cut.zip').write_bytes(raw[:len(raw) // 2])
    _refuses(tmp_path / 'cut.zip', 'cut.zip', 'neither a folder nor a ZIP')
    # A member larger than the limit is refused before it is read (a deflate bomb expands like this).
    monkeypatch.setattr(data, 'MAX_FILE_BYTES', 1000)
    big = _zip(tmp_path / 'big.zip', [('a.png', _png_bytes()), ('b.png', b'\0' * 5000)])
    _refuses(big, 'big.zip:b.png', '5000 bytes', item=1)
    monkeypatch.undo()
    # macOS clutter, hidden files and nested archives are not part of the dataset.
    clutter = _zip(tmp_path / 'mac.zip', [('a.png', _png_bytes(3)), ('__MACOSX/._a.png', b'\0\x05\x16\x07junk'),
                                          ('.hidden.png', b'junk'), ('inner.zip', big.read_bytes())])
    ds = ImageFolderDataset(clutter)
    assert ds.names == ['a.png'] and ds[0][0].max() == 3
    _nothing_written(tmp_path, ['crc.zip', 'cut.zip', 'big.zip', 'mac.zip'])


# ----------------------------------------------------------------------------------------------
# Damaged files (e.g. left by an earlier crash).

def _damaged_cases():
    noise = np.random.RandomState(0).randint(0, 256, (16, 16, 3), dtype=np.uint8)  # incompressible pixels
    buf = io.BytesIO()
    PIL.Image.fromarray(noise).save(buf, format='png')
    full = buf.getvalue()
    return [('empty.png', b'', 'empty file (0 bytes)'),
            ('head.png', full[:60], 'damaged image'),
            ('half.png', full[:len(full) // 2], 'damaged image'),
            ('garbage.png', b'this is not a picture' * 10, 'not an image'),
            ('bomb.png', _png16(200_000, 200_000, 0, np.zeros((0, 0, 1))),  # a header claiming 4·10^10 pixels
             'Image size (40000000000 pixels) exceeds limit'),
            ('line\nbreak.png', b'', 'line\\nbreak.png: empty file')]  # a newline in a name stays escaped


@pytest.mark.parametrize('kind', ['dir', 'zip'])
def test_damaged_images_are_one_line_naming_the_file(tmp_path, kind):
    for name, body, fragment in _damaged_cases():
        members = [('a.png', _png_bytes(size=16)), (name, body)]
        if kind == 'zip':
            src = _zip(tmp_path / 'src.zip', members)
        else:
            src = tmp_path / 'src'
            src.mkdir()
            for n, b in members:
                (src / n).write_bytes(b)
        shown = fragment if '\\n' in fragment else f'{name}: {fragment}'
        _refuses(src, shown, item=1)  # the training and metrics readers see a DatasetError
        r = _convert('--source', src, '--dest', tmp_path / 'out.zip')
        _assert_refused(r, shown, '--skip-bad')
        assert not (tmp_path / 'out.zip').exists() and len(list(tmp_path.iterdir())) == 1
        if kind == 'zip':
            src.unlink()
        else:
            for f in src.iterdir():
                f.unlink()
            src.rmdir()


def test_damaged_latent_arrays(tmp_path):
    good = io.BytesIO()
    np.save(good, np.zeros((8, 2, 2), np.float32))
    nan = io.BytesIO()
    np.save(nan, np.full((8, 2, 2), np.nan, np.float32))
    ints = io.BytesIO()
    np.save(ints, np.zeros((8, 2, 2), np.int64))
    pickled = io.BytesIO()
    np.save(pickled, np.array([{'x': 1}], dtype=object), allow_pickle=True)
    cases = [(b'', 'not a readable NPY'), (good.getvalue()[:100], 'not a readable NPY'),
             (nan.getvalue(), 'NaN or infinite'), (ints.getvalue(), 'floating-point'),
             (pickled.getvalue(), 'not a readable NPY')]
    for k, (body, fragment) in enumerate(cases):
        src = _zip(tmp_path / f'lat{k}.zip', [('a.npy', good.getvalue()), ('b.npy', body)])
        _refuses(src, f'lat{k}.zip:b.npy', fragment, item=1)


def test_reader_error_reaches_the_main_process_as_dataset_error(tmp_path):
    """With DataLoader workers, a damaged file mid-epoch arrives in the main process as a DatasetError
    (so the training loop can stop cleanly) and its last line names the file."""
    import torch
    src = tmp_path / 'src'
    src.mkdir()
    rnd = np.random.RandomState(0)
    for i in range(6):
        PIL.Image.fromarray(rnd.randint(0, 256, (8, 8, 3), dtype=np.uint8)).save(src / f'{i}.png')
    with open(src / '3.png', 'rb') as f:
        body = f.read()
    (src / '3.png').write_bytes(body[:60])  # head -c 60
    batches = iter(torch.utils.data.DataLoader(ImageFolderDataset(src), batch_size=2, num_workers=2))
    start = time.monotonic()
    try:
        with pytest.raises(DatasetError) as info:
            for _ in batches:
                pass
    finally:  # as the training loop does; else the workers are joined whenever garbage collection gets to them
        batches._shutdown_workers()
    assert time.monotonic() - start < 60
    assert str(info.value).strip().splitlines()[-1].endswith('3.png: damaged image: image file is truncated')


# ----------------------------------------------------------------------------------------------
# Labels.

@pytest.mark.parametrize('labels, fragment', [
    ([['a.png', 10 ** 8], ['b.png', 0]], 'class of "a.png" is 100000000; expected 0 <= class < 100000'),
    ([['a.png', -1], ['b.png', 0]], 'class of "a.png" is -1'),
    ([['a.png', 3.0], ['b.png', 0]], 'class of "a.png" is 3.0; expected an integer'),
    ([['a.png', '3'], ['b.png', 0]], 'class of "a.png" is "3"; expected an integer'),
    ([['a.png', True], ['b.png', 0]], 'is true; expected an integer'),
    ([['a.png', None], ['b.png', 0]], 'is null; expected an integer'),
    ([[3], ['b.png', 0]], 'labels[0] is [3]; expected ["file name", class]'),
    ([[7, 1], ['b.png', 0]], 'labels[0] is [7, 1]'),
    ([['a.png', 1, 2], ['b.png', 0]], 'labels[0] is ["a.png", 1, 2]'),
    ([['a.png', 1], ['b.png', 0], ['a.png', 1]], '"a.png" is labelled more than once'),
    ([['a.png', 1]], "no label for 'b.png'"),
    ({'a.png': 1, 'b.png': 0}, '"labels" must be null or a list'),
])
def test_bad_labels_are_refused(tmp_path, labels, fragment):
    src = tmp_path / 'src'
    _good_png(src / 'a.png')
    _good_png(src / 'b.png')
    (src / 'dataset.json').write_text(json.dumps({'labels': labels}))
    _refuses(src, 'dataset.json', fragment)
    _assert_refused(_convert('--source', src, '--dest', tmp_path / 'out.zip'), 'dataset.json', fragment)
    _nothing_written(tmp_path, ['src'])


@pytest.mark.parametrize('body, fragment', [
    (b'[["a.png", 0]]', 'expected a JSON object'),
    (b'{"labels": [["a.png", 0]', 'not valid JSON'),
    (b'\xff\xfe garbage', 'not valid JSON'),
    (b'[' * 100_000 + b']' * 100_000, 'not valid JSON'),
    (b'{"labels": [["a.png", NaN]]}', 'is NaN; expected an integer'),
])
def test_malformed_dataset_json_is_refused(tmp_path, body, fragment):
    src = tmp_path / 'src'
    _good_png(src / 'a.png')
    (src / 'dataset.json').write_bytes(body)
    _refuses(src, 'dataset.json', fragment)
    _assert_refused(_convert('--source', src, '--dest', tmp_path / 'out'), 'dataset.json', fragment)


def test_huge_label_costs_no_memory_and_valid_labels_still_work(tmp_path):
    src = tmp_path / 'src'
    _good_png(src / 'a.png')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', 10 ** 8]]}))
    tracemalloc.start()
    with pytest.raises(DatasetError):
        ImageFolderDataset(src, use_labels=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10 * 2 ** 20  # one one-hot row of width 10^8 alone would be 400 MB
    # The largest allowed class, and labels for files that are not in the dataset, are fine.
    (src / 'dataset.json').write_text(json.dumps({'labels': [['a.png', data.MAX_CLASSES - 1], ['gone.png', 0]]}))
    ds = ImageFolderDataset(src, use_labels=True)
    assert ds.label_dim == data.MAX_CLASSES and ds[0][1].argmax() == data.MAX_CLASSES - 1


# ----------------------------------------------------------------------------------------------
# Outputs.

def _source(folder, n=3):
    for i in range(n):
        _good_png(folder / f'{i}.png', value=10 * i)
    return folder


@pytest.mark.parametrize('umask', [0o027, 0o002])
def test_outputs_get_umask_permissions(tmp_path, umask):
    src = _source(tmp_path / 'src')
    old = os.umask(umask)
    try:
        assert _convert('--source', src, '--dest', tmp_path / 'out.zip').exit_code == 0
        assert _convert('--source', src, '--dest', tmp_path / 'new' / 'out').exit_code == 0
    finally:
        os.umask(old)
    mode = _permissions
    assert mode(tmp_path / 'out.zip') == 0o666 & ~umask
    folder = tmp_path / 'new' / 'out'
    for path in [tmp_path / 'new', folder, folder / '00000']:
        assert mode(path) == 0o777 & ~umask, path
    for path in [folder / 'dataset.json', folder / '00000' / 'img00000000.png']:
        assert mode(path) == 0o666 & ~umask, path


_SLOW_TOOL = '''
import sys, time
sys.path.insert(0, {repo!r})
from edm2.commands import dataset_tool
write = dataset_tool._Destination.write
def write_then_wait(self, name, data):  # a long conversion, frozen after its first image
    write(self, name, data)
    print('written', flush=True)
    time.sleep(600)
dataset_tool._Destination.write = write_then_wait
if __name__ == '__main__':  # convert's worker processes start by importing this script (spawn)
    dataset_tool.cli()
'''


@pytest.mark.parametrize('dest_name', ['out.zip', 'out'])
def test_kill_9_temporary_is_removed_by_the_next_run(tmp_path, dest_name):
    src = _source(tmp_path / 'src')
    script = tmp_path / 'slow_tool.py'
    script.write_text(_SLOW_TOOL.format(repo=REPO))
    proc = subprocess.Popen([sys.executable, str(script), 'convert', '--source', str(src),
                             '--dest', str(tmp_path / dest_name)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready and proc.stdout.readline().strip() == 'written'
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(f'.{dest_name}.edm2-')]
    assert len(left) == 1 and not (tmp_path / dest_name).exists()
    # A second, unrelated run in the same folder removes it and writes a complete output.
    r = _convert('--source', src, '--dest', tmp_path / dest_name)
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([dest_name, 'slow_tool.py', 'src'])
    assert len(ImageFolderDataset(tmp_path / dest_name)) == 3


def test_bad_destinations_are_refused_before_any_work(tmp_path):
    src = _source(tmp_path / 'src')
    (src / 'broken.png').write_bytes(b'')  # would fail the conversion: the destination is checked first
    (tmp_path / 'file.zip').write_bytes(b'precious')
    (tmp_path / 'full').mkdir()
    (tmp_path / 'full' / 'x').write_text('precious')
    (tmp_path / 'empty.zip').mkdir()
    (tmp_path / 'plain').write_text('precious')
    cases = [(tmp_path / 'file.zip', 'already exists'), (tmp_path / 'full', 'already exists'),
             (tmp_path / 'empty.zip', 'already exists'), (tmp_path / 'plain', 'already exists'),
             (tmp_path / 'plain' / 'out.zip', 'is not a folder'),
             (tmp_path / 'plain' / 'deeper' / 'out', 'is not a folder')]
    if os.path.isdir('/sys'):
        cases.append(('/sys/edm2-test-dataset.zip', 'cannot write there'))  # sysfs: refused even to root
    before = sorted(p.name for p in tmp_path.iterdir())
    for dest, fragment in cases:
        _assert_refused(_convert('--source', src, '--dest', dest), f'--dest {dest}', fragment)
        assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert (tmp_path / 'file.zip').read_bytes() == b'precious' and (tmp_path / 'full' / 'x').exists()


@pytest.mark.skipif(os.geteuid() == 0, reason='root may write into read-only folders')
def test_read_only_folder_is_refused(tmp_path):
    src = _source(tmp_path / 'src')
    locked = tmp_path / 'locked'
    locked.mkdir(mode=0o500)
    try:
        _assert_refused(_convert('--source', src, '--dest', locked / 'out.zip'), '--dest', 'cannot write there')
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_failed_run_removes_the_folders_it_created(tmp_path):
    src = _source(tmp_path / 'src')
    (src / 'zzz.png').write_bytes(b'\x89PNG\r\n')
    _assert_refused(_convert('--source', src, '--dest', tmp_path / 'a' / 'b' / 'out.zip'), 'zzz.png')
    _nothing_written(tmp_path, ['src'])


def test_refusal_in_a_real_process_is_one_line_on_stderr(tmp_path):
    src = _source(tmp_path / 'src')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['0.png', 10 ** 8]]}))
    proc = subprocess.run([sys.executable, os.path.join(REPO, 'dataset_tool.py'), 'convert', '--source', str(src),
                           '--dest', str(tmp_path / 'out.zip')], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ''
    assert proc.stderr.strip().splitlines() == [
        f'Error: --source: {src / "dataset.json"}: class of "0.png" is 100000000; expected 0 <= class < 100000']
    _nothing_written(tmp_path, ['src'])


def test_encode_refuses_bad_device_and_damaged_source_in_one_line(tmp_path):
    src = _source(tmp_path / 'src')
    (src / 'dataset.json').write_text(json.dumps({'labels': [['0.png', 0], ['1.png', 1], ['2.png', 'x']]}))
    run = _encode
    _assert_refused(run('--source', src, '--dest', tmp_path / 'lat.zip'), 'dataset.json', '"x"; expected an integer')
    (src / 'dataset.json').unlink()
    _assert_refused(run('--source', src, '--dest', tmp_path / 'lat.zip', '--device', 'cuda:7'), '--device cuda:7')
    _assert_refused(run('--source', src, '--dest', tmp_path / 'lat.zip', '--batch', '0'), '--batch', status=2)
    _nothing_written(tmp_path, ['src'])
