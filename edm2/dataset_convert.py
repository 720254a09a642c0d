"""The per-image work of `dataset_tool.py` spread over worker processes, in order: source files -> PNGs.

`converted(files, names, transform, size, workers)` yields, for each name, the dataset image it becomes:
PNG bytes (stored uncompressed, as the EDM2 release writes them) and the image size, or None when the
transform skips the image, or the `DatasetError` that names why it cannot be read. The workers read a
folder's files, decode, crop, scale and encode (a dozen images per worker ahead, see `edm2.worker_pool`);
a ZIP's members are read here, so that only one process holds the archive's directory.
Each image is converted by the same function whatever the number of workers, so the output is the
same bytes in the same order.

`dataset_images(ds, count, workers, batch)` yields the first `count` images of a dataset (`encode`'s
input), decoded by workers a batch or more ahead of the consumer, so decoding overlaps the VAE.
"""

import copy
import io

from .data import DatasetError, decode_image
from .dataset_transforms import TRANSFORMS, scale_only
from .worker_pool import CHUNK, IN_FLIGHT, ordered_map


def convert_image(data: bytes, where: str, transform=None, size=None):
    """(PNG bytes, (width, height)) of the dataset image made from the image file `data`, or None when
    `transform` skips it; `DatasetError` naming `where` when the file cannot be decoded."""
    img = decode_image(data, where).convert('RGB')
    img = TRANSFORMS[transform](img, *size) if transform else scale_only(img, *(size or (None, None)))
    if img is None:
        return None
    buf = io.BytesIO()
    img.save(buf, format='png', compress_level=0, optimize=False)
    return buf.getvalue(), img.size


def _convert(context, item):
    transform, size, reader = context
    name, data = item
    if isinstance(data, DatasetError):  # a ZIP member that could not be read
        return data
    try:
        if data is None:  # a folder's file, read here in the worker
            data = reader.read(name)
        return convert_image(data, reader.describe(name), transform, size)
    except DatasetError as e:  # per image, not fatal here: the caller decides (--skip-bad)
        return e


def _read(files, names):
    """(name, bytes) from a ZIP (read here: one process parses its directory), (name, None) from a folder."""
    for name in names:
        try:
            yield name, files.read(name) if files.is_zip else None
        except DatasetError as e:
            yield name, e


def _describe(context, item):
    return context[2].describe(item[0])


def converted(files, names, transform, size, workers):
    """Context manager yielding an iterator of `convert_image` results (or the `DatasetError` of an image
    that cannot be read or decoded) for `names` of `files` (an `edm2.data.FileTree`), in order.
    Leaving it early stops the workers."""
    reader = copy.copy(files)  # what a worker needs to read and name files: not the list of names
    reader.names = []
    return ordered_map(_convert, _read(files, names), workers, context=(transform, size, reader), describe=_describe)


def _image(ds, i):
    return ds[i][0]


def _image_name(ds, i):
    return f'image {ds.names[i]}'


def dataset_images(ds, count, workers, batch):
    """Context manager yielding an iterator of the uint8 [C, H, W] images ds[0], ..., ds[count - 1] of an
    `edm2.data.ImageFolderDataset`, read `batch` or more ahead; its `DatasetError` arrives in order."""
    in_flight = max(IN_FLIGHT, -(-batch // (max(workers, 1) * CHUNK)))  # a batch ahead at least
    return ordered_map(_image, range(count), workers, context=ds, in_flight=in_flight, describe=_image_name)
