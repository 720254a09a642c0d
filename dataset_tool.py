"""Prepare datasets for train_edm2.py and calculate_metrics.py (SPEC section 6).

  convert  images (folder or ZIP, any size) -> square, power-of-two PNG dataset (folder or ZIP)
  encode   PNG dataset -> raw Stability VAE latents (8 channels: posterior mean and std) as NPY files

The output uses the published layout: `00000/img00000000.png` ... (`img-mean-std-00000000.npy` for
latents), plus `dataset.json` = {"labels": [[name, class], ...] or null}. The destination is written
under a temporary name in the same folder and renamed when complete, so it never exists half-written.
"""

import io
import json
import os
import pathlib
import shutil
import tempfile
import zipfile

import click
import numpy as np

IMAGE_EXTENSIONS = {'.png', '.jpg', '.jpeg', '.bmp', '.webp', '.ppm', '.tif', '.tiff', '.jfif'}


# ----------------------------------------------------------------------------------------------
# Source reading.

class _Source:
    """Image files of a folder or ZIP, sorted, with labels from dataset.json or top-level folder names."""

    def __init__(self, path):
        self.path = str(path)
        p = pathlib.Path(path)
        self._zip = None
        if p.is_dir():
            files = sorted(f.relative_to(p).as_posix() for f in p.rglob('*') if f.is_file())
        elif p.is_file() and zipfile.is_zipfile(p):
            self._zip = zipfile.ZipFile(p)
            files = sorted(n for n in self._zip.namelist() if not n.endswith('/'))
        elif p.exists():
            raise click.ClickException(f'--source {self.path}: expected a folder or a ZIP archive of images')
        else:
            raise click.ClickException(f'--source {self.path}: not found')
        self.names = [n for n in files if pathlib.PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS]
        if not self.names:
            raise click.ClickException(f'--source {self.path}: contains no images')
        self.labels = None
        if 'dataset.json' in files:
            try:
                raw = json.loads(self.read('dataset.json')).get('labels')
                if raw is not None:
                    self.labels = {str(n): int(c) for n, c in raw}
            except (ValueError, TypeError, AttributeError) as e:
                raise click.ClickException(f'{self.describe("dataset.json")}: cannot parse labels ({e})') from None
        else:
            # ImageNet-style layout: every image sits under a top-level class folder.
            tops = [n.split('/', 1)[0] if '/' in n else None for n in self.names]
            if all(t is not None for t in tops) and len(set(tops)) > 1:
                classes = {t: i for i, t in enumerate(sorted(set(tops)))}
                self.labels = {n: classes[t] for n, t in zip(self.names, tops)}

    def describe(self, name):
        return f'{self.path}:{name}' if self._zip is not None else os.path.join(self.path, name)

    def read(self, name):
        if self._zip is not None:
            return self._zip.read(name)
        with open(os.path.join(self.path, name), 'rb') as f:
            return f.read()

    def label(self, name):
        if self.labels is None:
            return None
        if name not in self.labels:
            raise click.ClickException(f'{self.describe("dataset.json")}: no label for {name!r}')
        return self.labels[name]


def _open_image(source, name):
    import PIL.Image
    data = source.read(name)
    img = PIL.Image.open(io.BytesIO(data))
    img.load()
    return img.convert('RGB')


# ----------------------------------------------------------------------------------------------
# Transforms (SPEC section 6).

def _center_crop(img, width, height):
    import PIL.Image
    w, h = img.size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2
    img = img.crop((left, top, left + crop, top + crop))
    return img.resize((width, height), PIL.Image.LANCZOS)


def _center_crop_wide(img, width, height):
    """Crop a centred strip of aspect width:height, resize, and pad to a width x width canvas."""
    import PIL.Image
    w, h = img.size
    ch = int(np.round(w * height / width))
    if w < width or ch < height:
        return None  # too small to fill the strip without upsampling; skipped like the original tool
    top = (h - ch) // 2
    img = img.crop((0, top, w, top + ch)).resize((width, height), PIL.Image.LANCZOS)
    canvas = PIL.Image.new('RGB', (width, width))
    canvas.paste(img, (0, (width - height) // 2))
    return canvas


def _center_crop_dhariwal(img, width, height):
    """ADM preprocessing: halve with a box filter while the short side >= 2x target, bicubic-resize
    the short side to the target, then centre-crop."""
    import PIL.Image
    res = width
    while min(img.size) >= 2 * res:
        img = img.resize(tuple(x // 2 for x in img.size), resample=PIL.Image.BOX)
    scale = res / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=PIL.Image.BICUBIC)
    arr = np.asarray(img)
    top, left = (arr.shape[0] - res) // 2, (arr.shape[1] - res) // 2
    return PIL.Image.fromarray(arr[top:top + res, left:left + res])


def _resize_only(img, width, height):
    import PIL.Image
    if width is None or img.size == (width, height):
        return img
    return img.resize((width, height), PIL.Image.LANCZOS)


TRANSFORMS = {
    'center-crop': _center_crop,
    'center-crop-wide': _center_crop_wide,
    'center-crop-dhariwal': _center_crop_dhariwal,
}


def parse_resolution(value):
    if value is None:
        return None
    try:
        w, h = (int(v) for v in str(value).lower().split('x'))
        if w <= 0 or h <= 0:
            raise ValueError
        return w, h
    except ValueError:
        raise click.BadParameter(f'expected WxH such as 512x512, got {value!r}', param_hint='--resolution') from None


def _check_output_size(width, height, what):
    if width != height:
        raise click.ClickException(f'{what}: output would be {width}x{height}; datasets must be square')
    if width & (width - 1) or width < 1:
        raise click.ClickException(f'{what}: output resolution {width} is not a power of two')


# ----------------------------------------------------------------------------------------------
# Atomic destination.

class _Destination:
    """Folder or uncompressed ZIP written under a temporary name beside `dest`, renamed on commit."""

    def __init__(self, dest):
        self.dest = pathlib.Path(dest)
        self.is_zip = self.dest.suffix.lower() == '.zip'
        if self.dest.exists() and not (self.dest.is_dir() and not self.is_zip and not any(self.dest.iterdir())):
            raise click.ClickException(f'--dest {dest}: already exists; choose a new name or remove it')
        parent = self.dest.parent
        if not parent.is_dir():
            raise click.ClickException(f'--dest {dest}: parent folder {parent} does not exist')
        if self.is_zip:
            fd, tmp = tempfile.mkstemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=parent)
            os.close(fd)
            self.tmp = pathlib.Path(tmp)
            self._zip = zipfile.ZipFile(self.tmp, 'w', compression=zipfile.ZIP_STORED)
        else:
            self.tmp = pathlib.Path(tempfile.mkdtemp(prefix=f'.{self.dest.name}.', suffix='.tmp', dir=parent))

    def write(self, name, data: bytes):
        if self.is_zip:
            self._zip.writestr(name, data)
        else:
            path = self.tmp / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)

    def commit(self):
        if self.is_zip:
            self._zip.close()
        os.replace(self.tmp, self.dest)

    def abort(self):
        if self.is_zip:
            try:
                self._zip.close()
            except Exception:
                pass
            self.tmp.unlink(missing_ok=True)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)


def _archive_name(idx, stem='img', ext='png'):
    return f'{idx // 1000:05d}/{stem}{idx:08d}.{ext}'


# ----------------------------------------------------------------------------------------------

@click.group()
def cli():
    """Prepare datasets for train_edm2.py and calculate_metrics.py.

    \b
    Examples:
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img64.zip --resolution=64x64 --transform=center-crop-dhariwal
      python dataset_tool.py convert --source=downloads/imagenet/ILSVRC/Data/CLS-LOC/train \\
          --dest=datasets/img512.zip --resolution=512x512 --transform=center-crop-dhariwal
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
    """


@cli.command()
@click.option('--source', help='Input folder or ZIP of images', metavar='PATH', required=True)
@click.option('--dest', help='Output folder or .zip (uncompressed)', metavar='PATH', required=True)
@click.option('--max-images', help='Stop after this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--transform', help='Input crop/resize mode', type=click.Choice(sorted(TRANSFORMS)))
@click.option('--resolution', help='Output resolution (e.g. 512x512)', metavar='WxH')
@click.option('--skip-bad', help='Skip unreadable images (and count them) instead of stopping', is_flag=True)
def convert(source, dest, max_images, transform, resolution, skip_bad):
    """Convert an image folder or ZIP into a dataset: square, power-of-two PNGs and dataset.json.

    Labels come from the source's dataset.json, or else from top-level folder names (ImageNet
    layout: one folder per class, classes numbered in sorted order); otherwise there are none.

    \b
    Examples:
      python dataset_tool.py convert --source=photos/ --dest=datasets/photos64.zip \\
          --resolution=64x64 --transform=center-crop
    """
    from tqdm import tqdm

    size = parse_resolution(resolution)
    if transform is not None and size is None:
        raise click.UsageError(f'--transform={transform} needs --resolution')
    if size is not None:
        out_w = size[0]
        out_h = size[0] if transform == 'center-crop-wide' else size[1]  # wide pads to a square canvas
        _check_output_size(out_w, out_h, '--resolution')
    src = _Source(source)
    names = src.names
    out = _Destination(dest)
    labels, bad, idx = [], 0, 0
    expected = None
    try:
        bar = tqdm(names, desc='convert', unit='img', total=min(len(names), max_images or len(names)))
        for name in bar:
            if max_images is not None and idx >= max_images:
                break
            try:
                img = _open_image(src, name)
            except Exception as e:
                if skip_bad:
                    bad += 1
                    continue
                msg = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise click.ClickException(f'cannot read image {src.describe(name)}: {msg} '
                                           f'(use --skip-bad to skip such files)') from None
            if transform is None:
                img = _resize_only(img, *(size or (None, None)))
            else:
                img = TRANSFORMS[transform](img, *size)
                if img is None:
                    continue
            shape = (img.size[0], img.size[1])
            if expected is None:
                _check_output_size(*shape, src.describe(name))
                expected = shape
            elif shape != expected:
                raise click.ClickException(
                    f'{src.describe(name)}: is {shape[0]}x{shape[1]}, the first image {expected[0]}x{expected[1]}; '
                    f'use --resolution and --transform to make them equal')
            buf = io.BytesIO()
            img.save(buf, format='png', compress_level=0, optimize=False)
            arc = _archive_name(idx)
            out.write(arc, buf.getvalue())
            label = src.label(name)
            if label is not None:
                labels.append([arc, label])
            idx += 1
        bar.close()
        if idx == 0:
            raise click.ClickException(f'--source {source}: no image could be converted')
        out.write('dataset.json', json.dumps({'labels': labels if src.labels is not None else None}).encode())
        out.commit()
    except BaseException:
        out.abort()
        raise
    msg = f'Wrote {idx} images ({expected[0]}x{expected[1]}) to {dest}'
    if bad:
        msg += f'; skipped {bad} unreadable file{"s" if bad != 1 else ""}'
    click.echo(msg)


@cli.command()
@click.option('--model-url', help='VAE to use: a diffusers model name or a local folder', metavar='URL',
              default='stabilityai/sd-vae-ft-mse', show_default=True)
@click.option('--source', help='Input dataset (folder or ZIP of PNGs)', metavar='PATH', required=True)
@click.option('--dest', help='Output folder or .zip (uncompressed)', metavar='PATH', required=True)
@click.option('--max-images', help='Stop after this many images', metavar='INT', type=click.IntRange(min=1))
@click.option('--batch', help='Images per VAE call', metavar='INT', type=click.IntRange(min=1), default=8,
              show_default=True)
@click.option('--device', help='Device (default: cuda if available, else cpu)', metavar='STR')
def encode(model_url, source, dest, max_images, batch, device):
    """Encode a pixel dataset into raw Stability VAE latents (8 channels: posterior mean || std).

    \b
    Examples:
      python dataset_tool.py encode --source=datasets/img512.zip --dest=datasets/img512-sd.zip
      python dataset_tool.py encode --model-url=/models/sd-vae-ft-mse --source=ds/ --dest=ds-sd/
    """
    import torch
    from tqdm import tqdm

    from training.dataset import DatasetError, ImageFolderDataset

    try:
        ds = ImageFolderDataset(source, max_size=None, use_labels=False)
    except DatasetError as e:
        raise click.ClickException(str(e)) from None
    if ds.is_latent:
        raise click.ClickException(f'--source {source}: already contains latents (.npy); expected PNG images')
    if ds.num_channels != 3:
        raise click.ClickException(f'--source {source}: has {ds.num_channels} channels; the VAE needs RGB')
    if ds.resolution % 8:
        raise click.ClickException(f'--source {source}: resolution {ds.resolution} is not a multiple of 8')
    count = min(len(ds.names), max_images or len(ds.names))
    labels_all = None
    if ds.has_labels:
        labels_all = ImageFolderDataset(source, use_labels=True).labels

    try:
        from edm2.encoders import StabilityVAEEncoder
    except ImportError as e:
        raise click.ClickException(f'cannot import the VAE encoder ({e}); install the "vae" extra') from None
    from edm2 import distributed
    dev = distributed.default_device(device)
    vae = StabilityVAEEncoder(vae_name=model_url, batch_size=batch)
    out = _Destination(dest)  # after the argument checks: nothing is created for bad input
    try:
        try:
            vae.init(dev)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise click.ClickException(f'--model-url {model_url}: cannot load the VAE: {msg}') from None
        labels = []
        with tqdm(total=count, desc='encode', unit='img') as bar:
            for start in range(0, count, batch):
                idxs = range(start, min(start + batch, count))
                try:
                    imgs = np.stack([ds[i][0] for i in idxs])
                except DatasetError as e:
                    raise click.ClickException(str(e)) from None
                with torch.no_grad():
                    lat = vae.encode_pixels(torch.from_numpy(imgs).to(dev))
                lat = lat.to(torch.float32).cpu().numpy()
                for i, arr in zip(idxs, lat):
                    arc = _archive_name(i, stem='img-mean-std-', ext='npy')
                    buf = io.BytesIO()
                    np.save(buf, arr)
                    out.write(arc, buf.getvalue())
                    if labels_all is not None:
                        labels.append([arc, int(labels_all[i])])
                bar.update(len(idxs))
        out.write('dataset.json', json.dumps({'labels': labels if labels_all is not None else None}).encode())
        out.commit()
    except BaseException:
        out.abort()
        raise
    click.echo(f'Wrote {count} latents {tuple(lat.shape[1:])} to {dest}')


if __name__ == '__main__':
    cli()
