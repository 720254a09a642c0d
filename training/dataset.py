"""Image datasets for training and metrics (SPEC section 6).

A dataset is a folder or an uncompressed ZIP of PNG images (uint8 pixels) or NPY arrays (raw VAE
latents, [C, H, W]), listed in sorted order, with an optional `dataset.json` holding
{"labels": [[name, class_index], ...] or null}. Labels become one-hot rows of width max+1.

Files are read one item at a time (by DataLoader workers), so the whole dataset is never held in
memory. A ZIP is opened lazily once per process, so the object pickles cheaply into workers.
"""

import io
import json
import os
import pathlib
import zipfile

import numpy as np

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff'}
ARRAY_EXTENSIONS = {'.npy'}


class DatasetError(ValueError):
    """A dataset cannot be used; the message is one line and names the file."""


def _is_power_of_two(n):
    return n >= 1 and (n & (n - 1)) == 0


class ImageFolderDataset:
    """Folder or ZIP of PNG / NPY files.

    ds[i] -> (array uint8 [C,H,W] for images or float32 [C,H,W] for latents, onehot float32 [label_dim]).
    With xflip=True the dataset has twice as many items: the second half are horizontal mirror images.
    With max_size, a random subset (np.random.RandomState(random_seed)) of that many files is used,
    kept in sorted order.
    """

    def __init__(self, path, max_size=None, use_labels=False, xflip=False, random_seed=0):
        self.path = str(path)
        self._zipfile = None
        self._zip_pid = None
        p = pathlib.Path(self.path)
        if p.is_dir():
            self._type = 'dir'
            all_names = sorted(
                f.relative_to(p).as_posix() for f in p.rglob('*') if f.is_file())
        elif p.is_file():
            if not zipfile.is_zipfile(p):
                raise DatasetError(f'dataset {self.path} is neither a folder nor a ZIP archive')
            self._type = 'zip'
            try:
                all_names = sorted(n for n in self._get_zipfile().namelist() if not n.endswith('/'))
            except (OSError, zipfile.BadZipFile) as e:
                raise DatasetError(f'cannot read ZIP dataset {self.path}: {e}') from None
        else:
            raise DatasetError(f'dataset not found: {self.path}')

        exts = {pathlib.PurePosixPath(n).suffix.lower() for n in all_names}
        has_images = bool(exts & IMAGE_EXTENSIONS)
        has_arrays = bool(exts & ARRAY_EXTENSIONS)
        if has_images and has_arrays:
            raise DatasetError(f'dataset {self.path} mixes images and .npy arrays; expected one kind')
        wanted = ARRAY_EXTENSIONS if has_arrays else IMAGE_EXTENSIONS
        names = [n for n in all_names if pathlib.PurePosixPath(n).suffix.lower() in wanted]
        if not names:
            raise DatasetError(f'dataset {self.path} contains no PNG images or NPY arrays')
        self.is_latent = has_arrays

        # Labels from dataset.json (optional).
        labels = None
        if 'dataset.json' in all_names:
            try:
                meta = json.loads(self._open_file('dataset.json').read())
                raw = meta.get('labels') if isinstance(meta, dict) else None
            except (OSError, ValueError) as e:
                raise DatasetError(f'cannot parse {self._describe("dataset.json")}: {e}') from None
            if raw is not None:
                try:
                    table = {str(name): int(label) for name, label in raw}
                except (TypeError, ValueError):
                    raise DatasetError(
                        f'{self._describe("dataset.json")}: "labels" must be a list of [name, int] pairs') from None
                missing = [n for n in names if n not in table]
                if missing:
                    raise DatasetError(f'{self._describe("dataset.json")} has no label for {missing[0]!r}')
                labels = np.array([table[n] for n in names], dtype=np.int64)
                if labels.min() < 0:
                    raise DatasetError(f'{self._describe("dataset.json")}: negative class index')
        if use_labels and labels is None:
            raise DatasetError(f'dataset {self.path} has no labels (dataset.json with "labels"), '
                               f'but labels were requested')

        # Seeded random subset, kept in sorted order.
        idx = np.arange(len(names))
        if max_size is not None and max_size < len(names):
            if max_size < 1:
                raise DatasetError(f'max_size must be positive, got {max_size}')
            rnd = np.random.RandomState(random_seed % (1 << 31))
            idx = np.sort(rnd.permutation(len(names))[:max_size])
        self._raw_names = names
        self.names = [names[i] for i in idx]
        self._raw_labels = labels
        self._labels = labels[idx] if labels is not None else None
        self.has_labels = labels is not None
        self.use_labels = bool(use_labels)
        self.label_dim = int(labels.max()) + 1 if (use_labels and labels is not None) else 0
        self.xflip = bool(xflip)

        # Shape from the first item; every other item is checked when it is read.
        first = self._load_raw(0)
        if first.ndim != 3:
            raise DatasetError(f'{self._describe(self.names[0])}: expected a [C,H,W] array, got shape {first.shape}')
        self.image_shape = tuple(int(s) for s in first.shape)
        self.num_channels, h, w = self.image_shape
        if h != w:
            raise DatasetError(f'{self._describe(self.names[0])}: image is {w}x{h}; datasets must be square')
        self.resolution = h
        self.dtype = first.dtype

    # ------------------------------------------------------------------------------------------
    def _describe(self, name):
        return f'{self.path}:{name}' if self._type == 'zip' else os.path.join(self.path, name)

    def _get_zipfile(self):
        # One handle per process: DataLoader workers fork/spawn after construction.
        if self._zipfile is None or self._zip_pid != os.getpid():
            self._zipfile = zipfile.ZipFile(self.path)
            self._zip_pid = os.getpid()
        return self._zipfile

    def _open_file(self, name):
        if self._type == 'zip':
            return self._get_zipfile().open(name, 'r')
        return open(os.path.join(self.path, name), 'rb')

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_zipfile'] = None
        state['_zip_pid'] = None
        return state

    def close(self):
        if self._zipfile is not None:
            self._zipfile.close()
            self._zipfile = None

    def _load_raw(self, i):
        name = self.names[i]
        try:
            with self._open_file(name) as f:
                data = f.read()
            if self.is_latent:
                arr = np.load(io.BytesIO(data), allow_pickle=False)
            else:
                import PIL.Image
                with PIL.Image.open(io.BytesIO(data)) as img:
                    img.load()
                    if img.mode not in ('L', 'RGB'):
                        img = img.convert('RGB')
                    arr = np.asarray(img, dtype=np.uint8)
                if arr.ndim == 2:
                    arr = arr[:, :, None]
                arr = arr.transpose(2, 0, 1)
        except Exception as e:  # PIL / numpy raise many different types for damaged files
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DatasetError(f'cannot read {self._describe(name)}: {msg}') from None
        return np.ascontiguousarray(arr)

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
        arr = self._load_raw(i)
        if tuple(arr.shape) != self.image_shape:
            raise DatasetError(f'{self._describe(self.names[i])}: shape {tuple(arr.shape)} differs from '
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

    @property
    def is_power_of_two(self):
        return _is_power_of_two(self.resolution)

    def __repr__(self):
        return (f'ImageFolderDataset({self.path!r}, items={len(self)}, shape={self.image_shape}, '
                f'label_dim={self.label_dim})')
