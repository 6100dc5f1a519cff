"""Decoding one image file into the model's input: any size and mode to a uint8 C x H x W tensor."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


class ImageError(UserError):
    """An image that cannot be read."""


def to_mode(img: Image.Image, in_chans: int) -> Image.Image:
    """Grey, RGBA (composited on white), palette, CMYK, 16-bit ... to `L` (1 channel) or `RGB` (3)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    if img.mode == "I;16" or img.mode == "I":
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 256).clip(0, 255).astype(np.uint8))
    img = img.convert("RGB")
    return img.convert("L") if in_chans == 1 else img


def prepare(img: Image.Image, img_size: int, in_chans: int) -> torch.Tensor:
    """Convert the mode, resize the short side and centre-crop to `img_size`, as uint8 C x H x W."""
    img = to_mode(ImageOps.exif_transpose(img), in_chans)
    if img.size != (img_size, img_size):
        img = ImageOps.fit(img, (img_size, img_size), Image.Resampling.BICUBIC)
    array = np.asarray(img, dtype=np.uint8)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy())


class ImageTooLarge(ImageError):
    """An image whose header declares more pixels than allowed (refused before decoding)."""


def decode(source: str | Path | bytes, img_size: int, in_chans: int,
           max_pixels: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
    """Decode a file path or raw bytes to the model's input and the original (width, height).

    Raises `ImageError` with a one-line reason when it is not a readable image, and `ImageTooLarge`
    when its header declares more than `max_pixels` pixels (checked before any pixel is decoded)."""
    name = "uploaded image" if isinstance(source, bytes) else str(source)
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            if max_pixels is not None and img.width * img.height > max_pixels:
                raise ImageTooLarge(f"{name} has {img.width}x{img.height} pixels, over the limit of {max_pixels:,}")
            img.load()
            return prepare(img, img_size, in_chans), img.size
    except ImageError:
        raise
    except FileNotFoundError as e:
        raise ImageError(f"no such image file: {name}") from e
    except IsADirectoryError as e:
        raise ImageError(f"{name} is a directory, not an image file") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{name} is too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ImageError(f"cannot read {name} as an image: {e}") from e


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
