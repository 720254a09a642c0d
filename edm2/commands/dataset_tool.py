"""Command line that prepares datasets for train_edm2.py and calculate_metrics.py.

  convert  a folder or ZIP of images of any size -> a dataset of square, power-of-two PNGs
  encode   a PNG dataset -> raw Stability VAE latents (8 channels: posterior mean and std) as NPY files

Both write the layout of the EDM2 release (`00000/img00000000.png`, ..., `img-mean-std-00000000.npy`
for latents, plus `dataset.json` = {"labels": [[name, class], ...] or null}) into a folder or an
uncompressed ZIP. The output is built under a recognisable temporary name beside it (`edm2.fileio`)
and renamed when complete, so it never exists half-written; temporaries left by a killed earlier run
are removed when the next run starts. Files get the permissions the umask allows.
"""

import contextlib
import io
import os
import pathlib
import shutil
import zipfile

import click
import numpy as np
from tqdm import tqdm

from edm2 import fileio
from edm2.commands.cli import Group, Int, check_memory, fail, memory_error, one_line_errors, path_problem
from edm2.data import IMAGE_EXTENSIONS, DatasetError, FileTree, ImageFolderDataset, read_labels
from edm2.dataset_convert import converted, dataset_images
from edm2.dataset_transforms import TRANSFORMS
from edm2.errors import EDM2Error, one_line
from edm2.worker_pool import CHUNK, MAX_WORKERS_PER_CORE, WORKER_BYTES, usable_cores, worker_count
from edm2 import jsontext

MAX_RESOLUTION = 8192  # output side; a typo such as 51200x51200 would otherwise try to allocate gigabytes


# ----------------------------------------------------------------------------------------------
# Source images and their labels.

class _Source:
    """Images of a folder or ZIP (`edm2.data.FileTree`), sorted, with labels from its dataset.json or
    else from top-level folder names (ImageNet layout: one folder per class, numbered in sorted order)."""

    def __init__(self, path):
        try:
            self.files = FileTree(path)
            self.labels = read_labels(self.files)
        except DatasetError as e:
            fail(e, '--source')
        self.names = [n for n in self.files.names if pathlib.PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS]
        if not self.names:
            fail(f'--source {path}: contains no images')
        if self.labels is None:
            tops = [n.split('/', 1)[0] if '/' in n else None for n in self.names]
            if all(t is not None for t in tops) and len(set(tops)) > 1:
                classes = {t: i for i, t in enumerate(sorted(set(tops)))}
                self.labels = {n: classes[t] for n, t in zip(self.names, tops)}

    def label(self, name):
        if self.labels is None:
            return None
        if name not in self.labels:
            fail(f'{self.files.describe("dataset.json")}: no label for {name!r}')
        return self.labels[name]


# Memory (lower estimates) per output pixel while an image is converted (source, scaled and encoded copies, RGB
# bytes and float32 resampling), and per pixel of an image of a VAE batch (RGB in float32 and the encoder's
# first 128-channel activation). --max-images costs nothing of its own (the source's names are listed
# anyway); a VAE batch is checked once the source's resolution is known, for the images it will hold.
PIXEL_BYTES = 3 * 4 * 3
VAE_PIXEL_BYTES = (3 + 128) * 4


class Resolution(click.ParamType):
    """'WxH' -> (W, H), each side in [1, MAX_RESOLUTION]."""
    name = 'WxH'

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            w, h = (int(v) for v in str(value).lower().split('x'))
        except ValueError:
            self.fail(f'expected WxH such as 512x512, got {value!r}', param, ctx)
        if not (1 <= w <= MAX_RESOLUTION and 1 <= h <= MAX_RESOLUTION):
            self.fail(f'each side must lie in [1, {MAX_RESOLUTION}], got {value!r}', param, ctx)
        error = memory_error(w * h, PIXEL_BYTES, 'pixel')
        if error:
            self.fail(error, param, ctx)
        return w, h


def _check_output_size(width, height, what):
    if width != height:
        fail(f'{what}: output would be {width}x{height}; datasets must be square')
    if width & (width - 1):
        fail(f'{what}: output resolution {width} is not a power of two')


# ----------------------------------------------------------------------------------------------
# The output, built under a temporary name.

def _check_destination(dest):
    """One-line error before any work when `dest` exists (other than an empty folder for a folder
    output) or lies below a file."""
    problem = path_problem(dest)
    if problem:
        fail(f'--dest {dest}: {problem}')
    if dest.exists() or dest.is_symlink():
        empty_folder = dest.is_dir() and not dest.is_symlink() and not any(dest.iterdir())
        if dest.suffix.lower() == '.zip' or not empty_folder:
            fail(f'--dest {dest}: already exists; choose a new name or remove it')
    for parent in dest.parents:
        if parent.exists():
            if not parent.is_dir():
                fail(f'--dest {dest}: {parent} is not a folder')
            break


class _Destination:
    """A dataset folder or uncompressed ZIP written under `edm2.fileio.temporary_name(dest)` and
    renamed to `dest` by `commit()`; `abort()` deletes it. Creating it checks that `dest` can be
    written, and first removes temporaries of earlier runs that were killed."""

    def __init__(self, dest):
        self.dest = pathlib.Path(dest)
        self.is_zip = self.dest.suffix.lower() == '.zip'
        _check_destination(self.dest)
        self.tmp = fileio.temporary_name(self.dest)
        self._zip = self._dir = None
        self._folders = set()
        self._made = [p for p in self.dest.parents if not p.exists()]  # folders to remove again on abort
        try:
            self.dest.parent.mkdir(parents=True, exist_ok=True)
            fileio.remove_stale_temporaries(self.dest.parent)
            if self.is_zip:  # mode 'x': O_EXCL, so never through a link planted under the temporary's name
                self._zip = zipfile.ZipFile(self.tmp, 'x', compression=zipfile.ZIP_STORED)
            else:  # private until commit(), and written through its descriptor: nobody can redirect a write
                os.mkdir(self.tmp, 0o700)
                self._dir = os.open(self.tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            self.abort()
            fail(f'--dest {dest}: cannot write there: {e.strerror or one_line(e)}')

    def write(self, name, data: bytes):
        with self._full_disk():
            if self.is_zip:
                self._zip.writestr(name, data)
            else:
                folder = os.path.dirname(name)
                if folder and folder not in self._folders:
                    os.mkdir(folder, dir_fd=self._dir)  # mode 0777 less the umask
                    self._folders.add(folder)
                with fileio.create_new(name, dir_fd=self._dir) as f:
                    f.write(data)

    def commit(self):
        if self.is_zip:
            with self._full_disk():
                self._zip.close()
        else:
            os.fchmod(self._dir, 0o777 & ~fileio.umask())  # the permissions of a plain mkdir
        try:
            os.replace(self.tmp, self.dest)
        except OSError as e:
            fail(f'--dest {self.dest}: cannot move the finished output into place: {e.strerror or one_line(e)}')
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None

    @contextlib.contextmanager
    def _full_disk(self):
        """A full disk is one line naming --dest (the caller's abort() removes the partial output)."""
        try:
            with fileio.reporting_full_disk(self.dest):
                yield
        except fileio.NoSpaceError as e:
            fail(f'--dest {e}')

    def abort(self):
        if self._zip is not None:
            try:
                self._zip.close()
            except (OSError, ValueError):
                pass
        if self._dir is not None:
            os.close(self._dir)
            self._dir = None
        if self.tmp.is_dir() and not self.tmp.is_symlink():
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            self.tmp.unlink(missing_ok=True)
        for folder in self._made:  # innermost first; stops at one that is no longer empty
            try:
                folder.rmdir()
            except OSError:
                break


def _archive_name(idx, stem='img', ext='png'):
    return f'{idx // 1000:05d}/{stem}{idx:08d}.{ext}'


def _write_labels(out, labels):
    out.write('dataset.json', jsontext.dumps({'labels': labels}).encode())


# ----------------------------------------------------------------------------------------------

@click.group(cls=Group)
def cli():
    """Turn image collections into the datasets that train_edm2.py and calculate_metrics.py read.

    \b
    Examples:
      # ImageNet at 64x64 and 512x512 pixels with the ADM crop, then 512x512 as VAE latents:
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """


def _output_size(transform, resolution):
    if transform is not None and resolution is None:
        raise click.UsageError(f'--transform={transform} needs --resolution')
    if resolution is None:
        return None
    width = resolution[0]
    height = width if transform == 'center-crop-wide' else resolution[1]  # wide pads to a square canvas
    _check_output_size(width, height, '--resolution')
    return resolution


def _convert_images(src, out, transform, size, max_images, skip_bad, workers):
    """Write the converted images of `src` to `out`; return (count, (w, h), labels, skipped)."""
    labels, skipped, count, shape = [], 0, 0, None
    total = min(len(src.names), max_images or len(src.names))
    with tqdm(total=total, desc='convert', unit='img') as bar, \
            converted(src.files, src.names, transform, size, workers) as results:
        for name, result in zip(src.names, results):
            if count == total:
                break
            if isinstance(result, DatasetError):
                if not skip_bad:
                    fail(f'{one_line(result)} (--skip-bad skips such files)')
                skipped += 1
                continue
            if result is None:
                continue
            png, img_size = result
            if shape is None:
                _check_output_size(*img_size, src.files.describe(name))
                shape = img_size
            elif img_size != shape:
                fail(f'{src.files.describe(name)}: is {img_size[0]}x{img_size[1]}, the first image '
                     f'{shape[0]}x{shape[1]}; use --resolution and --transform to make them equal')
            out.write(_archive_name(count), png)
            if src.labels is not None:
                labels.append([_archive_name(count), src.label(name)])
            count += 1
            bar.update(1)
    return count, shape, labels, skipped


def _workers_option(what):
    return click.option('--workers', help=f'Processes that {what} (default: the usable CPU cores; 1: this '
                        f'process only). At most {MAX_WORKERS_PER_CORE} per usable core and one per '
                        f'{CHUNK} images are started', metavar='INT', type=Int(1, 1024), default=usable_cores)


def _started_workers(workers, items):
    """The workers worth starting for `items` images (`worker_count`), their memory checked."""
    count = worker_count(workers, items)
    if count > 1:
        check_memory('--workers', count, WORKER_BYTES, 'worker process')
    return count


@cli.command()
@click.option('--source', help='Folder or ZIP archive holding the images to convert', metavar='PATH', required=True)
@click.option('--dest', help='Dataset to create: a folder, or a .zip (stored uncompressed)', metavar='PATH',
              required=True)
@click.option('--max-images', help='Convert at most this many images', metavar='INT',
              type=Int(1))
@click.option('--transform', help='How images are cropped and scaled to --resolution',
              type=click.Choice(sorted(TRANSFORMS)))
@click.option('--resolution', help='Output size, width x height (e.g. 64x64)', metavar='WxH', type=Resolution())
@click.option('--skip-bad', help='Count and skip images that cannot be decoded instead of stopping', is_flag=True)
@_workers_option('decode, crop, scale and encode the images; the output is the same for any number')
@one_line_errors
def convert(source, dest, max_images, transform, resolution, skip_bad, workers):
    """Make a dataset of square, power-of-two PNGs and dataset.json from a folder or ZIP of images.

    Classes come from the source's dataset.json when it has one; otherwise, when every image sits
    in a top-level folder and there are several such folders (ImageNet layout), each folder is a
    class, numbered in sorted order; otherwise the dataset has no labels. 16-bit images keep their
    high byte and transparent pixels are composited onto black.

    \b
    Examples:
      python dataset_tool.py convert --source=photos/ --dest=datasets/photos64.zip \\
          --resolution=64x64 --transform=center-crop
    """
    size = _output_size(transform, resolution)
    out = _Destination(dest)  # checks --dest before the source is listed
    try:
        src = _Source(source)
        workers = _started_workers(workers, len(src.names))
        count, shape, labels, skipped = _convert_images(src, out, transform, size, max_images, skip_bad, workers)
        if count == 0:
            fail(f'--source {source}: no image could be converted')
        _write_labels(out, labels if src.labels is not None else None)
        out.commit()
    except BaseException:
        out.abort()
        raise
    message = f'Wrote {count} images ({shape[0]}x{shape[1]}) to {dest}'
    if skipped:
        message += f'; skipped {skipped} unreadable file{"s" if skipped != 1 else ""}'
    click.echo(message)


def _open_pixel_dataset(source):
    try:
        ds = ImageFolderDataset(source)
        labels = ImageFolderDataset(source, use_labels=True).labels if ds.has_labels else None
    except DatasetError as e:
        fail(e, '--source')
    if ds.is_latent:
        fail(f'--source {source}: already holds latents (.npy); expected PNG images')
    if ds.num_channels != 3:
        fail(f'--source {source}: has {ds.num_channels}-channel images; the VAE needs RGB')
    if ds.resolution % 8:
        fail(f'--source {source}: resolution {ds.resolution} is not a multiple of 8')
    return ds, labels


def _encode_images(vae, ds, labels_all, out, count, batch, device, workers):
    """Encode the first `count` images of `ds` to `out`; return (labels, latent shape). The images are
    decoded by `workers` processes while the VAE encodes the batch before."""
    import torch  # only encode needs torch; convert starts without it
    labels, shape = [], None
    with tqdm(total=count, desc='encode', unit='img') as bar, dataset_images(ds, count, workers, batch) as images:
        for start in range(0, count, batch):
            idxs = range(start, min(start + batch, count))
            try:
                pixels = np.stack([next(images) for _ in idxs])
            except DatasetError as e:
                fail(e)
            with torch.no_grad():
                latents = vae.encode_pixels(torch.from_numpy(pixels).to(device)).to(torch.float32).cpu().numpy()
            for i, arr in zip(idxs, latents):
                name = _archive_name(i, stem='img-mean-std-', ext='npy')
                buf = io.BytesIO()
                np.save(buf, arr)
                out.write(name, buf.getvalue())
                if labels_all is not None:
                    labels.append([name, int(labels_all[i])])
            shape = latents.shape[1:]
            bar.update(len(idxs))
    return labels, shape


@cli.command()
@click.option('--model-url', '--vae', 'model_url', help='Stability VAE: a Hugging Face model name or a local '
              'AutoencoderKL folder (save_pretrained; use one offline)',
              metavar='URL', default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Pixel dataset to encode (folder or ZIP of PNGs)', metavar='PATH', required=True)
@click.option('--dest', help='Latent dataset to create: a folder, or a .zip (stored uncompressed)', metavar='PATH',
              required=True)
@click.option('--max-images', help='Encode at most this many images', metavar='INT',
              type=Int(1))
@click.option('--batch', help='Images the VAE encodes at once', metavar='INT', default=8, show_default=True,
              type=Int(1, 65536))
@click.option('--device', help='Where the VAE runs (default: CUDA when present, else the CPU)', metavar='STR')
@_workers_option('decode the PNGs while the VAE encodes')
@one_line_errors
def encode(model_url, source, dest, max_images, batch, device, workers):
    """Encode a PNG dataset into raw Stability VAE latents: 8 channels, posterior mean then std.

    \b
    Examples:
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
      python dataset_tool.py encode --model-url=/models/sd-vae-ft-mse --source=ds/ --dest=ds-sd/
    """
    from edm2 import distributed  # imports torch
    ds, labels_all = _open_pixel_dataset(source)
    count = min(len(ds.names), max_images or len(ds.names))
    check_memory('--batch', min(batch, count), VAE_PIXEL_BYTES * ds.resolution ** 2, 'image')
    workers = _started_workers(workers, count)
    try:
        dev = distributed.default_device(device)
        from edm2.encoders import EncoderError, StabilityVAEEncoder
    except EDM2Error as e:
        fail(e)
    except ImportError as e:
        fail(f'cannot import the VAE encoder ({one_line(e)}); install the "vae" extra')
    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
    out = _Destination(dest)  # after the argument checks: nothing is created for bad input
    try:
        try:
            vae.init(dev)
        except EncoderError as e:  # one line naming the model and --vae
            fail(e)
        except Exception as e:  # diffusers/huggingface_hub raise many types for a missing or broken model
            fail(f'--model-url {model_url}: cannot load the VAE: {one_line(e)}')
        labels, shape = _encode_images(vae, ds, labels_all, out, count, batch, dev, workers)
        _write_labels(out, labels if labels_all is not None else None)
        out.commit()
    except BaseException:
        out.abort()
        raise
    click.echo(f'Wrote {count} latents {tuple(shape)} to {dest}')


if __name__ == '__main__':
    cli()
