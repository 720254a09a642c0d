"""Crop-and-scale transforms that turn source images of any size into dataset images (`dataset_tool.py convert`).

Each transform maps a PIL image and the requested output width and height to the output image, or to
None when the image should be skipped. `center-crop-dhariwal` follows the preprocessing of ADM
(Dhariwal & Nichol 2021, "Diffusion Models Beat GANs on Image Synthesis"): `center_crop_arr` in
guided-diffusion's image_datasets.py, https://github.com/openai/guided-diffusion,
Copyright (c) 2021 OpenAI, MIT licence.
"""

import numpy as np
import PIL.Image


def scale_only(img, width, height):
    """Resize to width x height with a Lanczos filter (no crop); unchanged without a target size."""
    if width is None or img.size == (width, height):
        return img
    return img.resize((width, height), PIL.Image.LANCZOS)


def _center_crop(img, width, height):
    """The largest centred square, resized to width x height."""
    side = min(img.size)
    left, top = (img.size[0] - side) // 2, (img.size[1] - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((width, height), PIL.Image.LANCZOS)


def _center_crop_wide(img, width, height):
    """A full-width centred strip of aspect width:height, resized and placed in the middle of a black
    width x width canvas; images narrower than the strip would need upsampling and are skipped."""
    strip = int(np.round(img.size[0] * height / width))
    if img.size[0] < width or strip < height:
        return None
    top = (img.size[1] - strip) // 2
    band = img.crop((0, top, img.size[0], top + strip)).resize((width, height), PIL.Image.LANCZOS)
    canvas = PIL.Image.new('RGB', (width, width))
    canvas.paste(band, (0, (width - height) // 2))
    return canvas


# Follows ADM's `center_crop_arr` (guided-diffusion, Copyright (c) 2021 OpenAI, MIT licence).
def _center_crop_dhariwal(img, width, height):
    """Box-filter halvings while the short side is at least twice the target, a bicubic resize that
    brings the short side to the target, then a centred crop."""
    while min(img.size) >= 2 * width:
        img = img.resize(tuple(side // 2 for side in img.size), resample=PIL.Image.BOX)
    factor = width / min(img.size)
    img = img.resize(tuple(round(side * factor) for side in img.size), resample=PIL.Image.BICUBIC)
    left, top = (img.size[0] - width) // 2, (img.size[1] - width) // 2
    return img.crop((left, top, left + width, top + width))


TRANSFORMS = {
    'center-crop': _center_crop,
    'center-crop-wide': _center_crop_wide,
    'center-crop-dhariwal': _center_crop_dhariwal,
}
