"""The one safe way the factory opens an image file: training data, eval.py and chat.py all call `open_image`.

What it guards against, each a FactoryError naming the file (and, through `context`, the sample):
- unreadable files (truncated JPEG, not an image, unsupported mode): the file is decoded fully here, not later;
- decompression bombs: a header that claims more pixels than PIL's `Image.MAX_IMAGE_PIXELS` (≈ 89.5 M) is refused
  before anything is decoded (PIL itself only warns below twice that limit);
- extreme aspect ratios (`max_aspect_ratio`, data.max_aspect_ratio in training): `image_aspect: pad` would allocate a
  long_side² canvas (a 100000×1 strip asks for ~30 GB) and `resize` would squash it into noise;
- paths outside the image folder (absolute paths, `../`, symlinks leading out), unless allowed.

And it converts every mode to 8-bit RGB *with the right scale*: PIL's own `convert("RGB")` clips 16-bit greyscale
(I;16*, I) to 255, so a 16-bit PNG becomes white; here such values are scaled by 255/65535. 8-bit modes (L, LA,
P, RGBA, CMYK, YCbCr, 1 ...) go through PIL's `convert("RGB")` exactly as LLaVA's `Image.open(...).convert('RGB')`
does (alpha is dropped, not composited), so images look to the model as they did to LLaVA-trained checkpoints.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import numpy as np
from PIL import Image

from factory.errors import FactoryError

# Beyond 20:1 a padded image keeps under 1/20 of the encoder's rows (≈ 17 of 336 for CLIP-L/336): nothing is left
# to see, and the pad canvas grows as long_side². Real data stays well below it (web banners ≈ 8:1).
DEFAULT_MAX_ASPECT_RATIO = 20.0
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def pixel_limit() -> Optional[int]:
    """PIL's decompression-bomb limit, read when used (a user who raised `Image.MAX_IMAGE_PIXELS` gets theirs)."""
    return Image.MAX_IMAGE_PIXELS


def resolve_in_folder(image_folder: Optional[str], name: str, allow_outside: bool = False,
                      context: str = "",
                      opt_in: str = "data.allow_outside_paths=true if the data file is yours") -> str:
    """`image_folder/name`, refused when it leads outside `image_folder` (absolute path, `..`, a symlink whose
    target lies elsewhere) unless `allow_outside`. Both sides are compared after resolving symlinks, so an
    image_folder that is itself a link is fine."""
    folder = image_folder or ""
    path = os.path.join(folder, name)
    if allow_outside:
        return path
    root = _real_dir(folder or ".")
    real = _real_path(path)
    if os.path.isabs(name) or not (real + os.sep).startswith(root.rstrip(os.sep) + os.sep):
        how = ("is an absolute path" if os.path.isabs(name)
               else "climbs out with '..'" if ".." in name.replace("\\", "/").split("/")
               else f"leads through a symlink to {real}")
        raise FactoryError(
            f"Image path {name!r}{context} {how}, outside image_folder {folder or '.'}; the factory only opens "
            f"images inside the image folder, so a data file cannot make it read other files. Move the image into "
            f"the folder, or set {opt_in} and the layout is meant."
        )
    return path


@functools.lru_cache(maxsize=65536)
def _real_dir(directory: str) -> str:
    """realpath of a folder, cached: 665k images live in a few hundred folders, and a realpath costs ~50 µs."""
    return os.path.realpath(directory)


def _real_path(path: str) -> str:
    """realpath(path) from the cached realpath of its folder; only a file that is itself a symlink is resolved anew."""
    if ".." in path.replace("\\", "/").split("/") or os.path.islink(path):
        return os.path.realpath(path)  # '..' after a linked folder must be resolved the way the OS does
    head, tail = os.path.split(path)
    return os.path.join(_real_dir(head or "."), tail)


def open_image(path: str, context: str = "", max_aspect_ratio: Optional[float] = DEFAULT_MAX_ASPECT_RATIO,
               max_pixels: Optional[int] = -1) -> Image.Image:
    """Decode `path` completely into an 8-bit RGB PIL image, or raise one FactoryError saying why.

    `context` is appended to the file name in messages (e.g. " of sample id 'x' (data.json, entry 3)");
    `max_pixels=-1` means PIL's current limit, None no limit; `max_aspect_ratio=None` turns that check off."""
    limit = pixel_limit() if max_pixels == -1 else max_pixels
    try:
        with Image.open(path) as image:
            check_size(image.size, path, context, max_aspect_ratio, limit)
            image.load()  # decode now: a truncated file fails here, with its name, not deep inside a transform
            return to_rgb(image)
    except FactoryError:
        raise
    except Image.DecompressionBombError as err:
        raise FactoryError(
            f"Image {path}{context} is refused as a decompression bomb (PIL: {err}). Downscale the image or remove "
            f"the sample."
        ) from None
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ValueError ...)
        raise FactoryError(
            f"Cannot read image {path}{context}: {type(err).__name__}: {err}. Replace the file or remove the sample."
        ) from None


def check_size(size, path: str, context: str, max_aspect_ratio: Optional[float], max_pixels: Optional[int]) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise FactoryError(f"Image {path}{context} is {width}×{height}: it has no pixels. Replace or remove it.")
    if max_pixels is not None and width * height > max_pixels:
        raise FactoryError(
            f"Image {path}{context} is {width}×{height} = {width * height:,} pixels, above the decompression-bomb "
            f"limit of {max_pixels:,} pixels (PIL's Image.MAX_IMAGE_PIXELS): refused as a decompression bomb, "
            f"decoding it could exhaust memory. Downscale the image or remove the sample."
        )
    ratio = max(width, height) / min(width, height)
    if max_aspect_ratio is not None and ratio > max_aspect_ratio:
        side = max(width, height)
        raise FactoryError(
            f"Image {path}{context} is {width}×{height}, an aspect ratio of {ratio:.4g}:1, above "
            f"data.max_aspect_ratio={max_aspect_ratio:g}: padding it to a square (image_aspect=pad) would need a "
            f"{side}×{side} canvas and resizing would squash it beyond recognition. Crop or remove the image, or "
            f"raise data.max_aspect_ratio."
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB with the value range of the source mode mapped onto 0..255 (see the module docstring)."""
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES:
        values = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
    elif mode == "I":  # 32-bit ints: 16-bit PNG/TIFF data in older Pillow; 8-bit data stays as it is
        values = np.asarray(image).astype(np.float64)
        top = float(values.max()) if values.size else 0.0
        values = values if top <= 255 else values * (255.0 / (65535.0 if top <= 65535 else top))
    elif mode == "F":  # floats: [0, 1] images are scaled up, [0, 255] kept, anything larger scaled by its maximum
        values = np.nan_to_num(np.asarray(image).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(values.max()) if values.size else 0.0
        values = values * 255.0 if top <= 1.0 else values if top <= 255 else values * (255.0 / top)
    elif mode == "P" and "transparency" in image.info:
        return image.convert("RGBA").convert("RGB")  # same pixels as convert("RGB"), without PIL's warning
    else:
        return image.convert("RGB") if mode != "RGB" else image.copy()
    grey = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8 → mode L
    return grey.convert("RGB")
