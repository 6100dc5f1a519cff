"""Decoding images within limits: the cost a decode may hold, known from the header before any pixel is decoded,
and early downscaling that keeps memory near the decoded buffer while giving the same model input."""

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from matvit import images

ROOT = Path(__file__).resolve().parents[2]


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth H x W x 3 uint8 picture (low-frequency waves), so that resampling methods agree closely."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    waves = [np.sin(2 * np.pi * (f1 * y + f2 * x) + p) for f1, f2, p in rng.uniform(0, 3, (3, 3))]
    return ((np.stack(waves, -1) + 1) * 127.5).astype(np.uint8)


def header_only_png(width: int, height: int, bit_depth: int, colour_type: int) -> bytes:
    """A PNG whose header declares width x height pixels but that holds almost no data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decode_cost_knows_the_mode():
    assert [images.pixel_bytes(m) for m in ("1", "L", "P", "I;16", "I;16B", "I", "F", "LA", "RGB", "RGBA", "CMYK")] \
        == [1, 1, 1, 2, 2, 4, 4, 4, 4, 4, 4]
    fixed = images.decode_cost("L", 1, 1, 32) - 1  # the work on the shrunk image and the decoder's state
    assert fixed == 32 * 32 * images.WORK_BYTES + images.DECODER_BYTES
    assert images.decode_cost("I;16", 10, 10, 32) == fixed + 200  # no shrinking: the buffer alone
    assert images.decode_cost("I;16", 640, 320, 32) == fixed + 409_600 + 409_600 * 32 // 640
    assert images.decode_cost("RGB", 640, 320, 32) == fixed + 819_200 + 819_200 * 32 // 640
    assert images.decode_cost("RGBA", 640, 320, 32) == fixed + 2 * 819_200 + 819_200 * 32 // 640


@pytest.mark.parametrize(("bit_depth", "colour_type", "mode"), [(16, 0, "I;16"), (8, 2, "RGB"), (8, 6, "RGBA"),
                                                                 (8, 0, "L")])
def test_over_the_byte_limit_is_refused_from_the_header(bit_depth, colour_type, mode):
    """A 6000 x 6000 header (36M pixels, under the pixel limit) is refused by its decode cost, before decoding:
    the file holds no pixels, so decoding it would fail differently."""
    content = header_only_png(6000, 6000, bit_depth, colour_type)
    cost = images.decode_cost(mode, 6000, 6000, images.GAP * 32)
    with pytest.raises(images.DecodeTooLarge, match=f"mode {mode}\\) needs {cost:,} bytes to decode, over the limit"):
        images.decode(content, 32, 3, max_pixels=40_000_000, max_bytes=cost - 1)
    with pytest.raises(images.DecodeTooLarge):
        images.preview(content, 32, max_bytes=cost - 1)
    with pytest.raises(images.ImageError, match="cannot read uploaded image") as raised:
        images.decode(content, 32, 3, max_pixels=40_000_000, max_bytes=cost)
    assert not isinstance(raised.value, images.ImageTooLarge)


def test_jpeg_decodes_at_a_reduced_scale():
    """A 4000 x 3000 JPEG would need 48 MB at full scale; for a 32-pixel input it decodes at 1/8 (750 KB)."""
    content = encoded(Image.fromarray(smooth(3000, 4000)), "JPEG", quality=90)
    limit = images.decode_cost("RGB", 500, 375, images.GAP * 32)
    tensor, size = images.decode(content, 32, 3, max_bytes=limit)
    assert size == (4000, 3000) and tuple(tensor.shape) == (3, 32, 32)
    full = images.prepare(Image.open(io.BytesIO(content)), 32, 3).float()
    assert (tensor.float() - full).abs().mean() < 1
    with pytest.raises(images.DecodeTooLarge):
        images.decode(content, 160, 3, max_bytes=limit)  # a 160-pixel input needs a larger scale


def sixteen_bit(height: int, width: int) -> Image.Image:
    grey = smooth(height, width)[..., 0].astype(np.uint16) * 257
    return Image.fromarray(grey)


def odd_kinds() -> dict[str, bytes]:
    """One image of each kind a decode treats apart: 16-bit grey, RGB and CMYK JPEG, an EXIF-rotated JPEG, RGBA
    and palette PNG, grey WebP; large enough to be shrunk before conversion."""
    rgb = Image.fromarray(smooth(700, 1100))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(smooth(700, 1100, seed=1)[..., 0]))
    exif = Image.Exif()
    exif[274] = 6  # the camera was turned: rotate 270 to make it upright
    return {"I;16 PNG": encoded(sixteen_bit(900, 650), "PNG"), "JPEG": encoded(rgb, "JPEG", quality=95),
            "CMYK JPEG": encoded(rgb.convert("CMYK"), "JPEG", quality=95),
            "rotated JPEG": encoded(rgb, "JPEG", quality=95, exif=exif), "RGBA PNG": encoded(rgba, "PNG"),
            "palette PNG": encoded(rgb.quantize(64), "PNG"), "grey WebP": encoded(rgb.convert("L"), "WEBP")}


@pytest.mark.parametrize("kind", list(odd_kinds()))
@pytest.mark.parametrize(("img_size", "in_chans"), [(8, 1), (32, 3), (224, 3)])
def test_decoding_gives_the_full_resolution_input(kind, img_size, in_chans):
    """Shrinking early gives the model input that converting and resizing the whole image gives."""
    content = odd_kinds()[kind]
    tensor, size = images.decode(content, img_size, in_chans, max_pixels=40_000_000,
                                 max_bytes=images.MAX_DECODE_BYTES)
    full = Image.open(io.BytesIO(content))
    assert size == full.size and tuple(tensor.shape) == (in_chans, img_size, img_size)
    reference = images.prepare(full, img_size, in_chans).float()
    # within 1 grey level on average; 3 (about 1%) at 8 pixels, where these waves come near the sampling limit
    assert (tensor.float() - reference).abs().mean() < (3 if img_size == 8 else 1)


@pytest.mark.parametrize("kind", list(odd_kinds()))
def test_previews_are_rgb_upright_and_within_their_size(kind):
    content = odd_kinds()[kind]
    picture = images.preview(content, 96, max_pixels=40_000_000, max_bytes=images.MAX_DECODE_BYTES)
    assert picture.dtype == np.uint8 and picture.ndim == 3 and picture.shape[2] == 3 and max(picture.shape) == 96
    full = Image.open(io.BytesIO(content))
    upright = (full.height, full.width) if kind != "rotated JPEG" else (full.width, full.height)
    assert picture.shape[0] > picture.shape[1] if upright[0] > upright[1] else picture.shape[0] < picture.shape[1]
    reference = images.to_mode(full if kind != "rotated JPEG" else full.transpose(Image.Transpose.ROTATE_270), 3)
    reference.thumbnail((96, 96))
    assert np.abs(picture.astype(float) - np.asarray(reference, dtype=float)).mean() < 3


MEASURE = """
import json, resource, sys
from matvit import images
content = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
images.decode(content, 224, 3, max_pixels=40_000_000)
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024))
"""


@pytest.mark.parametrize("kind", ["I;16 PNG", "JPEG", "RGBA PNG"])
def test_decode_memory_stays_within_its_cost(kind, tmp_path):
    """Decoding a 3000 x 3000 16-bit PNG, RGB JPEG or RGBA PNG for a 224-pixel input raises a fresh process's
    peak memory by no more than its decode cost (the buffer, not the several full-size copies that converting
    before shrinking made)."""
    file = tmp_path / "image"
    picture = Image.fromarray(smooth(3000, 3000))
    if kind == "I;16 PNG":
        file.write_bytes(encoded(sixteen_bit(3000, 3000), "PNG"))
        cost = images.decode_cost("I;16", 3000, 3000, images.GAP * 224)
    elif kind == "JPEG":
        file.write_bytes(encoded(picture, "JPEG"))
        cost = images.decode_cost("RGB", 1500, 1500, images.GAP * 224)  # decoded at 1/2 scale
    else:
        picture.putalpha(128)
        file.write_bytes(encoded(picture, "PNG"))
        cost = images.decode_cost("RGBA", 3000, 3000, images.GAP * 224)
    grown = json.loads(subprocess.run([sys.executable, "-c", MEASURE, str(file)], capture_output=True, text=True,
                                      check=True, cwd=ROOT).stdout)
    assert grown <= cost, f"decoding grew the peak by {grown / 1e6:.0f} MB, over its cost of {cost / 1e6:.0f} MB"
