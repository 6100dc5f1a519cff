"""Decoding one image file into the model's input: any size and mode to a uint8 C x H x W tensor."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import io
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageMode, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # the largest image an upload may declare (a server or demo default)
MAX_DECODE_BYTES = 128 * 2**20  # the most one upload's decode may hold (`decode_cost`; a server or demo default)


class ImageError(UserError):
    """An image that cannot be read."""


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Grey, RGBA (composited on white), palette, CMYK, 16-bit ... to `L` (1 channel) or `RGB` (3)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode.startswith("I;16") or img.mode == "I":
        img = Image.fromarray(np.clip(np.asarray(img) >> 8, 0, 255).astype(np.uint8))  # the top 8 of 16 bits
    img = img.convert("RGB")
    return img.convert("L") if in_chans == 1 else img


def prepare(img: Image.Image, img_size: int, in_chans: int) -> torch.Tensor:
    """Convert the mode, resize the short side and centre-crop to `img_size`, as uint8 C x H x W."""
    img = to_mode(ImageOps.exif_transpose(img), in_chans)
    if img.size != (img_size, img_size):
        img = ImageOps.fit(img, (img_size, img_size), Image.Resampling.BICUBIC)
    return _tensor(img)


def _tensor(img: Image.Image) -> torch.Tensor:
    array = np.asarray(img, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than allowed (refused before decoding)."""


class DecodeTooLarge(ImageTooLarge):
    """An image whose decoded pixels would take more bytes than allowed (refused before decoding)."""


def pixel_bytes(mode: str) -> int:
    """Bytes a pixel of `mode` takes in Pillow's decoded image: 4 for every multi-band mode (RGB is stored as
    RGBX), else the sample's size (1 for `1`, `L`, `P`; 2 for `I;16`; 4 for `I`, `F`)."""
    info = ImageMode.getmode(mode)
    return 4 if len(info.bands) > 1 else max(1, int(info.typestr[2:]))


GAP = 4  # an image is first shrunk (JPEG draft, box averaging) to this many times its final size, no smaller
WORK_BYTES = 24  # per pixel of the shrunk image: the conversions and the final resize (a bound)
DECODER_BYTES = 4 * 2**20  # the decoder's own state (libjpeg's, zlib's), whatever the image (a bound)
RELEASE_AFTER = 32 * 2**20  # a decode that costs this much gives its freed memory back to the system


def decode_cost(mode: str, width: int, height: int, target: int) -> int:
    """The bytes decoding a `mode` image of `width` x `height` pixels holds at its peak, when it is shrunk until
    its short (decode) or long side (preview) is `target` pixels: Pillow's decoded buffer (twice for modes with
    alpha: shrinking premultiplies a copy), the shrink's working copy (one side already shrunk: at most the
    buffer times `target` over the long side) and the work on the shrunk image (at most `target` squared pixels,
    `WORK_BYTES` each), and `DECODER_BYTES`."""
    buffer = width * height * pixel_bytes(mode)
    working = buffer * target // max(width, height) if max(width, height) > target else 0
    return buffer * (2 if mode in ("RGBA", "LA") else 1) + working + target * target * WORK_BYTES + DECODER_BYTES


ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_90}  # EXIF orientation -> the transposition that makes the image upright


def _shrink(img: Image.Image, box: tuple[float, float, float, float], scale: float) -> Image.Image:
    """The `box` region of `img` (fractional edges allowed), `scale` times its size by box averaging (nearest
    neighbour for palette and bilevel modes, whose values are not intensities) when the scale is under 1, else
    cut out at whole pixels (widened by under a pixel)."""
    if scale >= 1:
        whole = (math.floor(box[0]), math.floor(box[1]), math.ceil(box[2]), math.ceil(box[3]))
        return img if whole == (0, 0, *img.size) else img.crop(whole)
    size = (max(1, round((box[2] - box[0]) * scale)), max(1, round((box[3] - box[1]) * scale)))
    nearest = img.mode in ("1", "P", "PA")
    return img.resize(size, Image.Resampling.NEAREST if nearest else Image.Resampling.BOX, box=box)


@contextlib.contextmanager
def _opened(source: str | Path | bytes, target: int, max_pixels: int | None, max_bytes: int | None
            ) -> Iterator[tuple[Image.Image, tuple[int, int], int]]:
    """The opened, not yet decoded image, its original (width, height) and its `decode_cost`: the header checked
    against the limits, JPEG set to decode at the smallest scale that keeps both sides at least `target`. Any failure
    reading it, here or in the caller's block, becomes an `ImageError`."""
    name = "uploaded image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            size = img.size
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{name} has {img.width}x{img.height} pixels, over the limit of {max_pixels:,}")
            if img.format == "JPEG":
                img.draft(None, (target, target))
            cost = decode_cost(img.mode, *img.size, target)
            if max_bytes is not None and cost > max_bytes:
                raise DecodeTooLarge(f"{name} ({size[0]}x{size[1]} pixels, mode {img.mode}) needs {cost:,} bytes "
                                     f"to decode, over the limit of {max_bytes:,}")
            yield img, size, cost
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"no such image file: {name}") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name} is a directory, not an image file") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name} is too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"cannot read {name} as an image: {e}") from e


def _upright(small: Image.Image, original: Image.Image) -> Image.Image:
    method = ORIENTATION.get(original.getexif().get(ExifTags.Base.Orientation))
    return small if method is None else small.transpose(method)


def decode(source: str | Path | bytes, img_size: int, in_chans: int, max_pixels: int | None = None,
           max_bytes: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode a file path or raw bytes to the model's input and the original (width, height).

    Raises `ImageError` with a one-line reason when it is not a readable image, `ImageTooLarge` when its header
    declares more than `max_pixels` pixels and `DecodeTooLarge` when decoding it would take more than `max_bytes`
    (`decode_cost`; both checked before any pixel is decoded). Memory stays near the decoded buffer: JPEG decodes
    at a reduced scale, and the centre square is shrunk to `GAP` times `img_size` before any conversion; after a
    large decode the freed memory goes back to the system."""
    tensor, size, cost = _decode(source, img_size, in_chans, max_pixels, max_bytes)
    if cost >= RELEASE_AFTER:
        release_freed_memory()
    return tensor, size


def _decode(source: str | Path | bytes, img_size: int, in_chans: int, max_pixels: int | None,
            max_bytes: int | None) -> tuple[torch.Tensor, tuple[int, int], int]:
    target = GAP * img_size
    with _opened(source, target, max_pixels, max_bytes) as (img, size, cost):
        img.load()
        side = min(img.size)
        left, top = (img.width - side) / 2, (img.height - side) / 2
        small = _shrink(img, (left, top, left + side, top + side), target / side)
        small = to_mode(_upright(small, img), in_chans)
        if small.size != (img_size, img_size):
            small = ImageOps.fit(small, (img_size, img_size), Image.Resampling.BICUBIC)
        return _tensor(small), size, cost


def preview(source: str | Path | bytes, size: int, max_pixels: int | None = None,
            max_bytes: int | None = None) -> np.ndarray:
    """An RGB H x W x 3 uint8 picture of an image file for display, its long side at most `size`, decoded within
    the same limits and with the same conversions as `decode`."""
    picture, cost = _preview(source, size, max_pixels, max_bytes)
    if cost >= RELEASE_AFTER:
        release_freed_memory()
    return picture


def _preview(source: str | Path | bytes, size: int, max_pixels: int | None,
             max_bytes: int | None) -> tuple[np.ndarray, int]:
    target = GAP * size
    with _opened(source, target, max_pixels, max_bytes) as (img, _, cost):
        img.load()
        small = to_mode(_upright(_shrink(img, (0, 0, *img.size), target / max(img.size)), img), 3)
        small.thumbnail((size, size), Image.Resampling.BICUBIC)
        return np.asarray(small, dtype=np.uint8).copy(), cost


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> None:
    """Hand the memory the C allocator holds free back to the system (glibc's `malloc_trim`; nothing elsewhere).
    Without it a decoded image's freed buffers stay resident in the decoding thread's allocator arena."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def load(source: str | Path | bytes, img_size: int, in_chans: int) -> torch.Tensor:
    """`decode` without the original size."""
    return decode(source, img_size, in_chans)[0]


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """A uint8 C x H x W image as the H x W (one channel) or H x W x 3 array PIL and Streamlit take."""
    return np.ascontiguousarray(image.detach().cpu().permute(1, 2, 0).squeeze(-1).numpy())


def to_png(image: torch.Tensor) -> bytes:
    """A uint8 C x H x W image as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(to_hwc(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images to the model's float input in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)
