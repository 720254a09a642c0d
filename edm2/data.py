"""Reading image datasets: a folder or ZIP archive of PNG images or NPY latent arrays, with class labels.

A dataset (the layout of the EDM2 release, which `dataset_tool.py` writes) holds files such as
`00000/img00000000.png`, listed in sorted order, and optionally a top-level `dataset.json` =
{"labels": [[name, class_index], ...] or null}. Images become uint8 arrays [C, H, W] with C = 1
(greyscale) or 3 (RGB); NPY files hold raw VAE latents [C, H, W] in floating point. Labels become
one-hot rows of width max + 1.

Untrusted input is checked where it is read, and every problem is a one-line `DatasetError` naming
the file: ZIP members with unsafe or duplicated names, damaged or empty files, pixel formats that
have no unambiguous 8-bit meaning, and malformed labels. Files are read one item at a time (by
DataLoader workers), so the dataset is never held in memory; a ZIP is opened lazily once per
process, so dataset objects pickle cheaply into workers.
"""

import io
import json
import os
import pathlib
import zipfile

import numpy as np
import PIL.Image

from .errors import EDM2Error, numpy_reason, one_line

IMAGE_EXTENSIONS = frozenset({'.png', '.jpg', '.jpeg', '.jfif', '.bmp', '.webp', '.ppm', '.pgm', '.tif', '.tiff'})
ARRAY_EXTENSIONS = frozenset({'.npy'})

# Class indices must lie in [0, MAX_CLASSES): the one-hot rows and the network's class embedding
# have max + 1 columns, so one stray large index (a typo, a hash) would otherwise cost gigabytes.
# The bound is several times the largest public class-conditional image dataset (ImageNet-21k,
# 21 841 classes).
MAX_CLASSES = 100_000

# A single file larger than this is refused before it is read (a ZIP member's size is known from
# the archive directory; a deflated member can expand far beyond the archive's size).
MAX_FILE_BYTES = 1 << 30


class DatasetError(EDM2Error):
    """A dataset (or one of its files) cannot be used; the message is one line and names the file."""


def printable(text) -> str:
    """`text` with control characters and undecodable bytes escaped, so that a file name cannot break
    a one-line message or the terminal."""
    return ''.join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _is_hidden(name):
    # Hidden files and folders (editor backups, macOS '._x.png' resource forks, our own temporaries)
    # and the '__MACOSX/' folder that macOS adds to ZIP archives are not part of a dataset.
    return any(part.startswith('.') or part == '__MACOSX' for part in name.split('/'))


class FileTree:
    """The regular files of a folder or ZIP archive, by '/'-separated relative name (hidden ones
    skipped, see `_is_hidden`); `read(name)` returns a file's bytes.

    ZIP member names are checked once: absolute names, '.', '..' or empty components, and a name
    that occurs twice (of which `zipfile` would silently read only the last) are refused.
    """

    def __init__(self, path):
        self.path = str(path)
        self._zip = None
        self._zip_pid = None
        p = pathlib.Path(self.path)
        if p.is_dir():
            self.is_zip = False
            self.names = self._walk_folder(p)
        elif p.is_file():
            if not zipfile.is_zipfile(p):
                raise DatasetError(f'{printable(self.path)}: is neither a folder nor a ZIP archive')
            self.is_zip = True
            try:
                self.names = self._list_archive(self._archive())
            except (OSError, zipfile.BadZipFile, EOFError) as e:
                raise DatasetError(f'{printable(self.path)}: cannot read the ZIP archive: {one_line(e)}') from None
        elif p.exists():
            raise DatasetError(f'{printable(self.path)}: is neither a folder nor a ZIP archive')
        else:
            raise DatasetError(f'{printable(self.path)}: not found')

    @staticmethod
    def _walk_folder(root):
        def refuse(error):  # an unreadable subfolder would otherwise drop its images without a word
            raise DatasetError(f'cannot list {printable(error.filename)}: {error.strerror}')

        names = []
        for folder, subfolders, files in os.walk(root, onerror=refuse):  # linked folders not followed (no cycles)
            subfolders[:] = [d for d in subfolders if not _is_hidden(d)]
            rel = pathlib.Path(folder).relative_to(root).as_posix()
            for f in files:
                name = f if rel == '.' else f'{rel}/{f}'
                if not _is_hidden(f) and os.path.isfile(os.path.join(folder, f)):  # no pipes, sockets
                    names.append(name)
        return sorted(names)

    def _list_archive(self, archive):
        seen = set()
        for info in archive.infolist():
            name = info.filename
            parts = name.rstrip('/').split('/')
            if name.startswith('/') or any(part in ('', '.', '..') for part in parts):
                raise DatasetError(f'{printable(self.path)}: member {printable(name)!r} has an unsafe path '
                                   f'(absolute, or with ".", ".." or empty parts); refusing the archive')
            if name in seen:
                raise DatasetError(f'{printable(self.path)}: member {printable(name)!r} occurs more than once; '
                                   f'only one copy could be read, so the archive is refused')
            seen.add(name)
        return sorted(n for n in seen if not n.endswith('/') and not _is_hidden(n))

    def _archive(self):
        # One handle per process: DataLoader workers fork/spawn after construction.
        if self._zip is None or self._zip_pid != os.getpid():
            self._zip = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zip

    def describe(self, name) -> str:
        """Printable location of file `name`: 'archive.zip:member' or 'folder/name'."""
        return printable(f'{self.path}:{name}' if self.is_zip else os.path.join(self.path, name))

    def read(self, name) -> bytes:
        """Bytes of file `name`; `DatasetError` naming it when it cannot be read or is too large."""
        try:
            path = os.path.join(self.path, name)
            size = self._archive().getinfo(name).file_size if self.is_zip else os.path.getsize(path)
            if size > MAX_FILE_BYTES:
                raise DatasetError(f'{self.describe(name)}: {size} bytes, more than the limit of {MAX_FILE_BYTES}')
            if self.is_zip:
                return self._archive().read(name)
            with open(path, 'rb') as f:
                return f.read()
        except DatasetError:
            raise
        except Exception as e:  # OSError, BadZipFile (bad CRC), RuntimeError (encrypted), NotImplementedError
            raise DatasetError(f'cannot read {self.describe(name)}: {one_line(e)}') from None

    def close(self):
        if self._zip is not None:
            self._zip.close()
            self._zip = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_zip'] = None
        state['_zip_pid'] = None
        return state


# ----------------------------------------------------------------------------------------------
# Decoding one file.

_SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
_COLOUR_MODES = ('RGB', 'RGBX', 'P', 'CMYK', 'YCbCr', 'LAB', 'HSV')  # converted to RGB by Pillow
_ALPHA_MODES = ('LA', 'La', 'PA', 'RGBA', 'RGBa')


def _has_alpha(img):
    return img.mode in _ALPHA_MODES or 'transparency' in img.info or \
        (img.mode == 'P' and img.palette is not None and img.palette.mode.endswith('A'))


def _composite_on_black(img):
    """Colour × alpha, rounded (alpha compositing onto a black background, the same black that
    `center-crop-wide` pads with); fully opaque pixels are unchanged."""
    grey = img.mode in ('L', 'LA', 'La', '1')
    arr = np.asarray(img.convert('LA' if grey else 'RGBA'), dtype=np.uint32)
    colour, alpha = arr[..., :-1], arr[..., -1:]
    out = ((colour * alpha + 127) // 255).astype(np.uint8)
    return PIL.Image.fromarray(out[..., 0] if grey else out, 'L' if grey else 'RGB')


def to_8bit(img, where) -> PIL.Image.Image:
    """A decoded image as mode 'L' (greyscale) or 'RGB', 8 bits per channel; `DatasetError` for
    pixel formats without an unambiguous 8-bit meaning.

    16-bit values v become v >> 8 (the high byte). This is what Pillow itself does when it opens
    16-bit colour PNGs, so 16-bit grey and colour files of the same picture agree, and it is exact
    for 16-bit files made from 8-bit ones (v = 257 · u gives u back). Against the exact level v / 257
    it errs by less than one level (rounding: half a level) with zero mean over all 16-bit values;
    round(v / 257) would differ from Pillow's colour path in a quarter of the values. Pixels with
    transparency are composited onto black (a 16-bit grey image's one transparent value becomes 0).
    Floating-point ('F') and 32-bit integer ('I') pixels have no defined white level and are
    refused, except 'I' from PNG/PGM, which holds 16-bit values.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES or (mode == 'I' and img.format in ('PNG', 'PPM')):
        arr = np.asarray(img).astype(np.int64)
        if arr.size and (arr.min() < 0 or arr.max() > 0xFFFF):
            raise DatasetError(f'{where}: {mode} pixels outside the 16-bit range [0, 65535]')
        out = (arr >> 8).astype(np.uint8)
        if isinstance(img.info.get('transparency'), int):  # one fully transparent grey value (PNG tRNS)
            out[arr == img.info['transparency']] = 0
        return PIL.Image.fromarray(out, 'L')
    if mode in ('I', 'F'):
        kind = 'floating-point' if mode == 'F' else '32-bit integer'
        raise DatasetError(f'{where}: {kind} pixels (mode {mode}) have no defined white level; '
                           f'save the image with 8 or 16 bits per channel')
    if _has_alpha(img):
        return _composite_on_black(img)
    if mode == 'L':
        return img
    if mode == '1':
        return img.convert('L')
    if mode in _COLOUR_MODES:
        return img.convert('RGB')
    raise DatasetError(f'{where}: unsupported pixel format (mode {mode})')


def decode_image(data: bytes, where: str) -> PIL.Image.Image:
    """Decode image file bytes into mode 'L' or 'RGB' (see `to_8bit`); `where` names the file in the
    one-line `DatasetError` raised for an empty, damaged or unsupported file."""
    if not data:
        raise DatasetError(f'cannot read {where}: empty file (0 bytes), e.g. left by an interrupted copy')
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
    except PIL.UnidentifiedImageError:
        raise DatasetError(f'cannot read {where}: not an image in a format Pillow can read') from None
    except PIL.Image.DecompressionBombError as e:  # a header claiming billions of pixels
        raise DatasetError(f'cannot read {where}: {one_line(e)}') from None
    except Exception as e:  # truncated or corrupt data: OSError, SyntaxError, ValueError, zlib.error, ...
        raise DatasetError(f'cannot read {where}: damaged image: {one_line(e)}') from None
    return to_8bit(img, where)


def image_array(img) -> np.ndarray:
    """uint8 array [C, H, W] of a mode 'L' or 'RGB' image."""
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def decode_array(data: bytes, where: str) -> np.ndarray:
    """A floating-point [C, H, W] array from NPY file bytes (never unpickles); finite values only."""
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # empty or truncated file, bad header, pickled objects
        raise DatasetError(f'cannot read {where}: not a readable NPY array: {numpy_reason(e)}') from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != 'f' or arr.ndim != 3:
        raise DatasetError(f'{where}: expected a floating-point [C,H,W] array, got '
                           f'{getattr(arr, "dtype", type(arr).__name__)} of shape {getattr(arr, "shape", "?")}')
    if not np.isfinite(arr).all():
        raise DatasetError(f'{where}: contains NaN or infinite values')
    return arr


# ----------------------------------------------------------------------------------------------
# Labels.

def _short(value):
    text = json.dumps(value) if not isinstance(value, bytes) else repr(value)
    return printable(text if len(text) <= 40 else text[:37] + '...')


def parse_labels(data: bytes, where: str):
    """{name: class index} from the bytes of a dataset.json, or None when it has no labels.

    "labels" must be null or a list of [name, class] pairs: names are strings, each at most once;
    classes are integers (not 3.0, not "3") in [0, MAX_CLASSES). Labels for files that are not in
    the dataset are allowed (a subset of a labelled dataset stays usable).
    """
    try:
        meta = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise DatasetError(f'{where}: not valid JSON: {one_line(e)}') from None
    if not isinstance(meta, dict):
        raise DatasetError(f'{where}: expected a JSON object {{"labels": ...}}, got {_short(meta)}')
    raw = meta.get('labels')
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise DatasetError(f'{where}: "labels" must be null or a list of [name, class] pairs, got {_short(raw)}')
    table = {}
    for k, entry in enumerate(raw):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)):
            raise DatasetError(f'{where}: labels[{k}] is {_short(entry)}; expected ["file name", class]')
        name, label = entry
        if type(label) is not int:  # bool is an int subclass, and 3.0 or "3" are typos, not classes
            raise DatasetError(f'{where}: class of {_short(name)} is {_short(label)}; expected an integer')
        if not 0 <= label < MAX_CLASSES:
            raise DatasetError(f'{where}: class of {_short(name)} is {label}; expected 0 <= class < {MAX_CLASSES}')
        if name in table:
            raise DatasetError(f'{where}: {_short(name)} is labelled more than once')
        table[name] = label
    return table


def read_labels(tree: FileTree):
    """Labels of `tree` from its top-level dataset.json (see `parse_labels`); None without one."""
    if 'dataset.json' not in tree.names:
        return None
    where = tree.describe('dataset.json')
    return parse_labels(tree.read('dataset.json'), where)


# ----------------------------------------------------------------------------------------------

class ImageFolderDataset:
    """Folder or ZIP of PNG images or NPY arrays (see the module docstring).

    ds[i] -> (uint8 [C,H,W] image or floating-point [C,H,W] latents, one-hot float32 [label_dim]).
    With xflip=True the dataset has twice as many items: the second half are horizontal mirror images.
    With max_size, a random subset (np.random.RandomState(random_seed)) of that many files is used,
    kept in sorted order.
    """

    def __init__(self, path, max_size=None, use_labels=False, xflip=False, random_seed=0):
        self.path = str(path)
        self._files = FileTree(self.path)
        names = self._select_names(self._files.names)
        labels = self._labels_of(names)
        if use_labels and labels is None:
            raise DatasetError(f'{printable(self.path)}: has no labels (dataset.json with "labels"), '
                               f'but labels were requested')
        idx = np.arange(len(names))
        if max_size is not None and max_size < len(names):
            if max_size < 1:
                raise DatasetError(f'max_size must be positive, got {max_size}')
            rnd = np.random.RandomState(random_seed % (1 << 31))
            idx = np.sort(rnd.permutation(len(names))[:max_size])
        self.names = [names[i] for i in idx]
        self._labels = labels[idx] if labels is not None else None
        self.has_labels = labels is not None
        self.use_labels = bool(use_labels)
        self.label_dim = int(labels.max()) + 1 if (use_labels and labels is not None) else 0
        self.xflip = bool(xflip)

        # Shape from the first item; every other item is checked when it is read.
        first = self._load(0)
        where = self._files.describe(self.names[0])
        if first.ndim != 3:
            raise DatasetError(f'{where}: expected a [C,H,W] array, got shape {first.shape}')
        self.image_shape = tuple(int(s) for s in first.shape)
        self.num_channels, h, w = self.image_shape
        if h != w:
            raise DatasetError(f'{where}: image is {w}x{h}; datasets must be square')
        self.resolution = h
        self.dtype = first.dtype

    def _select_names(self, all_names):
        exts = {pathlib.PurePosixPath(n).suffix.lower() for n in all_names}
        has_images, has_arrays = bool(exts & IMAGE_EXTENSIONS), bool(exts & ARRAY_EXTENSIONS)
        if has_images and has_arrays:
            raise DatasetError(f'{printable(self.path)}: mixes images and .npy arrays; expected one kind')
        wanted = ARRAY_EXTENSIONS if has_arrays else IMAGE_EXTENSIONS
        names = [n for n in all_names if pathlib.PurePosixPath(n).suffix.lower() in wanted]
        if not names:
            raise DatasetError(f'{printable(self.path)}: contains no PNG images or NPY arrays')
        self.is_latent = has_arrays
        return names

    def _labels_of(self, names):
        table = read_labels(self._files)
        if table is None:
            return None
        for name in names:
            if name not in table:
                raise DatasetError(f'{self._files.describe("dataset.json")}: no label for {printable(name)!r}')
        return np.array([table[n] for n in names], dtype=np.int64)

    def _load(self, i):
        name = self.names[i]
        where = self._files.describe(name)
        data = self._files.read(name)
        if self.is_latent:
            return decode_array(data, where)
        return image_array(decode_image(data, where))

    def close(self):
        self._files.close()

    def __len__(self):
        return len(self.names) * (2 if self.xflip else 1)

    def raw_index(self, idx):
        """Index into `names` of item idx (items past len(names) are mirrored copies)."""
        return idx % len(self.names)

    def __getitem__(self, idx):
        if not -len(self) <= idx < len(self):
            raise IndexError(idx)
        idx = idx % len(self)
        i = self.raw_index(idx)
        arr = self._load(i)
        if tuple(arr.shape) != self.image_shape:
            raise DatasetError(f'{self._files.describe(self.names[i])}: shape {tuple(arr.shape)} differs from '
                               f'the first item\'s {self.image_shape}')
        if idx >= len(self.names):
            arr = np.ascontiguousarray(arr[:, :, ::-1])
        return arr, self.get_label(i)

    def get_label(self, i):
        """One-hot float32 label of file i (width label_dim; empty when labels are unused)."""
        onehot = np.zeros(self.label_dim, dtype=np.float32)
        if self.label_dim:
            onehot[self._labels[i]] = 1
        return onehot

    @property
    def labels(self):
        """Class indices of the files in use (None when the dataset has no labels)."""
        return None if self._labels is None else self._labels.copy()

    def __repr__(self):
        return (f'ImageFolderDataset({self.path!r}, items={len(self)}, shape={self.image_shape}, '
                f'label_dim={self.label_dim})')
