"""ADM evaluator batch files (.npz): safe reading and validation, and streaming, atomic writing.

NOTICE: the file layout is that of guided-diffusion's `evaluations/evaluator.py` (Dhariwal & Nichol,
NeurIPS 2021; MIT licence, Copyright (c) 2021 OpenAI); the code is written here.

A batch file is an uncompressed NumPy `.npz` (a ZIP of `.npy` members):

    arr_0            uint8 [N, H, W, C] images, NHWC, C = 3 (or 1)
    arr_1            int64 [N] class labels (labelled sample batches only)
    mu, sigma        float64 [2048], [2048, 2048]: Inception pool statistics (reference batches)
    mu_s, sigma_s    float64 [2023], [2023, 2023]: sFID statistics (reference batches)

The published reference batches (`VIRTUAL_imagenet{64,128,256,512}.npz`) hold 10 000 images in arr_0
plus the statistics of the whole dataset. Files are read with `np.load(allow_pickle=False)` (arr_0 is
streamed from the ZIP member in row ranges after the same header checks): object arrays are refused,
and a 10 000 x 512^2 arr_0 never sits in memory at once. Writers stream arr_0 row by row into the ZIP
member under a temporary name and rename when complete (edm2.fileio), so a 50 000 x 512^2 sample batch
(39 GB) is written with the memory of one batch of images.
"""

import contextlib
import os
import sys
import zipfile

import numpy as np
import torch

from edm2 import distributed
from edm2.download import local_file
from edm2.errors import EDM2Error, numpy_reason, one_line
from edm2.fileio import atomic_path, create_new, open_temporary, temporary_name

IMAGES, LABELS = 'arr_0', 'arr_1'
STAT_KEYS = {'fid': ('mu', 'sigma'), 'sfid': ('mu_s', 'sigma_s')}


class AdmFileError(EDM2Error):
    """An ADM batch file cannot be used; one-line message naming the file and the key."""


class AdmBatch:
    """An opened ADM batch file: `keys`, small arrays via `array(key)`, images via `image_rows`."""

    def __init__(self, path_or_url):
        self.path = local_file(path_or_url, AdmFileError, 'ADM batch file')
        try:
            with open(self.path, 'rb') as f:
                signature = f.read(4)
            if signature != b'PK\x03\x04':  # numpy would try it as a pickle, and advise loading it "unsafely"
                raise AdmFileError(f'{self.path} is not a valid .npz file (it does not start as a ZIP archive does)')
            with np.load(self.path, allow_pickle=False) as z:
                self.keys = list(z.files)
        except AdmFileError:
            raise
        except Exception as e:
            raise AdmFileError(f'{self.path} is not a valid .npz file: {numpy_reason(e)}') from None
        self.image_shape = self._image_header() if IMAGES in self.keys else None

    def error(self, key, what) -> AdmFileError:
        return AdmFileError(f'{self.path}: {key} {what}')

    def array(self, key, ndim=None, dtype_kind=None) -> np.ndarray:
        """Member `key` (never an object array), checked for `ndim` and dtype kind ('f', 'i', 'u')."""
        if key not in self.keys:
            raise self.error(key, f'missing (the file has: {", ".join(self.keys) or "nothing"})')
        try:
            with np.load(self.path, allow_pickle=False) as z:
                a = z[key]
        except Exception as e:  # object arrays: numpy's text suggests allow_pickle, which we never give
            raise self.error(key, f'cannot be read: {numpy_reason(e)}') from None
        if ndim is not None and a.ndim != ndim:
            raise self.error(key, f'has shape {list(a.shape)}; expected {ndim} dimensions')
        if dtype_kind is not None and a.dtype.kind not in dtype_kind:
            raise self.error(key, f'has dtype {a.dtype}; expected {"a float" if dtype_kind == "f" else "an integer"} '
                                  f'array')
        return a

    def statistics(self, metric, dim):
        """(mu [dim], sigma [dim, dim]) float64 of 'fid' or 'sfid', or None when the file has neither key."""
        keys = STAT_KEYS[metric]
        if not any(k in self.keys for k in keys):
            return None
        mu, sigma = self.array(keys[0], 1, 'f').astype(np.float64), self.array(keys[1], 2, 'f').astype(np.float64)
        if mu.shape != (dim,):
            raise self.error(keys[0], f'has shape {list(mu.shape)}; expected [{dim}] (different detector?)')
        if sigma.shape != (dim, dim):
            raise self.error(keys[1], f'has shape {list(sigma.shape)}; expected [{dim}, {dim}]')
        return mu, sigma

    def _image_header(self):
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(IMAGES + '.npy') as f:
                shape, fortran, dtype = _read_header(f)
        except Exception as e:
            raise self.error(IMAGES, f'cannot be read: {one_line(e)}') from None
        if dtype.hasobject:
            raise self.error(IMAGES, 'is an object array (not allowed)')
        if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] not in (1, 3) or shape[0] < 1:
            raise self.error(IMAGES, f'has shape {list(shape)} and dtype {dtype}; expected uint8 images '
                                     f'[N, H, W, 3] (NHWC)')
        return tuple(int(v) for v in shape)

    def num_images(self) -> int:
        if self.image_shape is None:
            raise self.error(IMAGES, f'missing (the file has: {", ".join(self.keys) or "nothing"})')
        return self.image_shape[0]

    def image_rows(self, ranges):
        """Yield uint8 [n, H, W, C] arrays for the increasing (start, stop) row `ranges` of arr_0."""
        n, h, w, c = self.image_shape
        row = h * w * c
        with zipfile.ZipFile(self.path) as zf, zf.open(IMAGES + '.npy') as f:
            _read_header(f)
            base, pos = f.tell(), 0
            for start, stop in ranges:
                if start < pos or stop > n:
                    raise ValueError(f'row ranges must increase within 0..{n}')
                f.seek(base + start * row)
                data = f.read((stop - start) * row)
                if len(data) != (stop - start) * row:
                    raise self.error(IMAGES, 'is truncated')
                pos = stop
                yield np.frombuffer(data, np.uint8).reshape(stop - start, h, w, c)


def _read_header(f):
    """(shape, fortran_order, dtype) of the .npy stream `f`, leaving it at the first data byte."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f'unsupported .npy format version {version}')


# ----------------------------------------------------------------------------------------------------
# Writing.

class _NpzStream:
    """Members of an uncompressed .npz written one after another; arrays may be streamed in row chunks."""

    def __init__(self, path):
        self._file = open_temporary(path)  # never through a link put in the temporary's place
        self.zip = zipfile.ZipFile(self._file, 'w', compression=zipfile.ZIP_STORED, allowZip64=True)

    def begin(self, key, shape, dtype):
        f = self.zip.open(key + '.npy', 'w', force_zip64=True)
        header = {'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)), 'fortran_order': False,
                  'shape': tuple(int(v) for v in shape)}
        if len(repr(header)) > 60000:  # version 1.0 headers are limited to 65 535 bytes
            np.lib.format.write_array_header_2_0(f, header)
        else:
            np.lib.format.write_array_header_1_0(f, header)
        return f

    def add(self, key, array):
        array = np.ascontiguousarray(array)
        with self.begin(key, array.shape, array.dtype) as f:
            f.write(array.tobytes())

    def close(self):
        try:
            self.zip.close()
        finally:
            self._file.close()


class NpzImageWriter:
    """Writes an ADM batch file: arr_0 streamed in row order, then arr_1 and any statistics.

        with NpzImageWriter(path, num_images, (H, W, C), labels=True) as w:
            w.append(images_nhwc_uint8, labels)      # as often as needed, num_images rows in total
            w.extra['mu'] = ...                      # optional further members, written at the end

    The file appears under `path` only when every row was written (a temporary name until then).
    """

    def __init__(self, path, num_images, image_shape, labels=False):
        self.path, self.num_images, self.image_shape = str(path), int(num_images), tuple(image_shape)
        self.labels = [] if labels else None
        self.extra = {}
        self.count = 0

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        tmp = self._stack.enter_context(atomic_path(self.path))
        self._npz = _NpzStream(tmp)
        self._images = self._npz.begin(IMAGES, (self.num_images,) + self.image_shape, np.uint8)
        return self

    def append(self, images, labels=None):
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f'expected uint8 images [n, {", ".join(map(str, self.image_shape))}], '
                             f'got {images.dtype} {list(images.shape)}')
        if self.count + len(images) > self.num_images:
            raise ValueError(f'more than {self.num_images} images written to {self.path}')
        self._images.write(np.ascontiguousarray(images).tobytes())
        if self.labels is not None:
            self.labels.append(np.asarray(labels, dtype=np.int64).reshape(len(images)))
        self.count += len(images)

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self.count != self.num_images:
                raise ValueError(f'{self.path}: {self.count} of {self.num_images} images written')
            self._images.close()
            if exc_type is None:
                if self.labels is not None:
                    self._npz.add(LABELS, np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64))
                for key, value in self.extra.items():
                    self._npz.add(key, value)
            self._npz.close()
        except BaseException:
            self._stack.__exit__(*sys.exc_info())
            raise
        return self._stack.__exit__(exc_type, exc, tb)


class SampleBatchSink:
    """Generated images of every rank -> one ADM sample batch file in the order of `seeds`.

    Each rank calls `add(seeds, images, labels)` for its batches (uint8 NCHW tensors, as
    `edm2.generation.generate` yields them) and then `finish()` (collective). One process streams straight
    into the file; under torchrun each rank streams its rows to a temporary file beside `path` and rank 0
    then copies them, chunk by chunk in seed order, into the batch file (the folder must be shared by
    the ranks, as with --outdir).
    """

    def __init__(self, path, seeds, chunk=256):
        self.path, self.seeds, self.chunk = str(path), [int(s) for s in seeds], int(chunk)
        self.world = distributed.get_world_size()
        self._writer = self._raw = None
        self._seen, self._labels, self._shape = [], [], None

    def add(self, seeds, images: torch.Tensor, labels=None):
        array = images.permute(0, 2, 3, 1).cpu().numpy()
        lab = None if labels is None else labels.cpu().numpy().astype(np.int64)
        if self._shape is None:
            self._shape = array.shape[1:]
            self._has_labels = lab is not None
            if self.world == 1:
                self._writer = NpzImageWriter(self.path, len(self.seeds), self._shape, labels=lab is not None)
                self._writer.__enter__()
            else:
                self._raw_path = str(temporary_name(self.path))
                self._raw = create_new(self._raw_path)
        if self._writer is not None:
            if [int(s) for s in seeds] != self.seeds[len(self._seen):len(self._seen) + len(seeds)]:
                raise ValueError('a single process must generate the seeds in order')
            self._writer.append(array, lab)
        else:
            self._raw.write(np.ascontiguousarray(array).tobytes())
            if lab is not None:
                self._labels.append(lab)
        self._seen.extend(int(s) for s in seeds)

    def tee(self, batches):
        """Yield `batches` (`edm2.generation.GeneratedBatch`) unchanged, adding each to the file; an error or
        an early stop aborts the file (nothing is left under its name)."""
        try:
            for b in batches:
                self.add(b.seeds, b.images, b.labels)
                yield b
        except BaseException:
            self.abort()
            raise

    def abort(self):
        if self._writer is not None:
            self._writer.__exit__(RuntimeError, RuntimeError('aborted'), None)
            self._writer = None
        if self._raw is not None:
            self._raw.close()
            with contextlib.suppress(OSError):
                os.unlink(self._raw_path)
            self._raw = None

    def finish(self):
        if self.world == 1:
            writer, self._writer = self._writer, None
            if writer is None:
                raise ValueError(f'{self.path}: no images were generated')
            writer.__exit__(None, None, None)
            return
        if self._raw is not None:
            self._raw.close()
        mine = dict(path=getattr(self, '_raw_path', None), seeds=self._seen, shape=self._shape,
                    labels=np.concatenate(self._labels) if self._labels else None)
        parts = [None] * self.world
        torch.distributed.all_gather_object(parts, mine)
        try:
            if distributed.is_main():
                self._assemble(parts)
        finally:
            distributed.barrier()
            if mine['path'] is not None:
                with contextlib.suppress(OSError):
                    os.unlink(mine['path'])
            self._raw = None

    def _assemble(self, parts):
        parts = [p for p in parts if p['seeds']]
        shape = parts[0]['shape']
        where = {}
        for r, p in enumerate(parts):
            for row, s in enumerate(p['seeds']):
                where[s] = (r, row)
        maps = [np.memmap(p['path'], np.uint8, 'r', shape=(len(p['seeds']),) + tuple(shape)) for p in parts]
        labelled = parts[0]['labels'] is not None
        with NpzImageWriter(self.path, len(self.seeds), shape, labels=labelled) as w:
            for start in range(0, len(self.seeds), self.chunk):
                owners = [where[s] for s in self.seeds[start:start + self.chunk]]
                images = np.stack([maps[r][row] for r, row in owners])
                labels = np.array([parts[r]['labels'][row] for r, row in owners]) if labelled else None
                w.append(images, labels)
        del maps
