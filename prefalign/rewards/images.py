"""Image loading and conversion shared by every reward adapter.

Official reward code receives `PIL.Image` objects in RGB (ImageReward, PickScore and the LAION aesthetic
predictor all call `.convert("RGB")` before preprocessing). This module turns whatever a user hands us -- a
path, a PIL image, a uint8/uint16 array or a float tensor in [0, 1] -- into exactly that, handling the modes
plain `.convert("RGB")` gets wrong (16-bit) or that PIL refuses by default (very large images).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from prefalign.errors import PrefalignError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Above this many pixels an image is box-reduced by an integer factor before conversion, so an 8-bit RGB copy
# never exceeds ~200 MB; every reward resizes to ~224 px anyway. Below it, conversion is bit-exact with PIL.
MAX_PIXELS = 64_000_000
# Files larger than this are refused (decompression-bomb guard); PIL's own default refuses ~179 MP.
HARD_MAX_PIXELS = 1_000_000_000


class ImageLoadError(PrefalignError):
    """One image could not be read; the message names it. `prefalign score` skips it and reports it."""


@contextmanager
def _allow_large_images() -> Iterator[None]:
    """Temporarily raise PIL's decompression-bomb limit to HARD_MAX_PIXELS (it is a process global)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = HARD_MAX_PIXELS // 2  # PIL errors at 2x this, warns at 1x
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _reduce_if_huge(img: Image.Image, max_pixels: int) -> Image.Image:
    """Box-reduce by the smallest integer factor that brings the image under `max_pixels`."""
    pixels = img.width * img.height
    if pixels <= max_pixels:
        return img
    return img.reduce(math.ceil(math.sqrt(pixels / max_pixels)))


def _sixteen_to_eight(arr: np.ndarray) -> np.ndarray:
    """Round 16-bit values to 8 bits (x / 257, round half up) in integer arithmetic to keep huge images
    small."""
    wide = np.clip(arr, 0, 65535).astype(np.uint32)
    return ((wide * 2 + 257) // 514).astype(np.uint8)


def _to_eight_bit_mode(img: Image.Image) -> Image.Image:
    """Map the modes `.convert("RGB")` mishandles, or `Image.reduce` rejects, onto 8-bit modes.

    PIL's `.convert('L')` of 16-bit data clips values above 255 instead of rescaling them, turning most 16-bit
    images white; 'I' may also carry plain 8-bit data from some decoders, which is kept as is.
    """
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img)
        if img.mode == "I" and arr.max(initial=0) <= 255:
            return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), mode="L")
        return Image.fromarray(_sixteen_to_eight(arr), mode="L")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0  # float images are either [0, 1] or [0, 255]
        return Image.fromarray(np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P":
        return img.convert("RGBA")
    if img.mode == "1":
        return img.convert("L")
    return img


def to_rgb(img: Image.Image, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB as the official rewards see it.

    RGBA/LA/P-with-transparency drop the alpha channel (what `.convert("RGB")` in the official ImageReward and
    PickScore code does); grayscale, CMYK and YCbCr convert through PIL; 16-bit grayscale is rescaled, not
    clipped. Images above `max_pixels` are box-reduced first (see MAX_PIXELS).
    """
    if img.mode == "RGB" and img.width * img.height <= max_pixels:
        return img
    img = _reduce_if_huge(_to_eight_bit_mode(img), max_pixels)
    return img if img.mode == "RGB" else img.convert("RGB")


class ImageWarning(UserWarning):
    """Something about an input image worth one line, e.g. a multi-frame file scored on its first frame."""


def decode_file(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file fully, in its own mode (callers convert); any failure is an ImageLoadError naming
    the file. A multi-frame file gives its first frame, with an ImageWarning."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such image file")
    try:
        with _allow_large_images(), Image.open(path) as img:
            frames = getattr(img, "n_frames", 1)
            if frames > 1:
                img.seek(0)
                warnings.warn(f"{path}: {frames} frames; scored on its first frame", ImageWarning,
                              stacklevel=2)
            if img.width * img.height > max_pixels and img.format == "JPEG":
                # JPEG can decode straight at 1/2, 1/4 or 1/8 scale: never materialise the full-size raster.
                img.draft("RGB", (img.width // 8 or 1, img.height // 8 or 1))
            img.load()
            return img
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(f"{path}: cannot read image ({type(err).__name__}: {err})") from None


def open_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read an image file fully into an RGB PIL image; any failure is an ImageLoadError naming the file."""
    return to_rgb(decode_file(path, max_pixels), max_pixels)


def _array_to_pil(arr: np.ndarray) -> Image.Image:
    """HWC/HW uint8 or uint16 array (1, 3 or 4 channels) -> PIL image."""
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.dtype == np.uint16:
        arr = _sixteen_to_eight(arr)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise PrefalignError(
            f"image array of dtype {arr.dtype} and shape {arr.shape} is not supported; "
            "pass uint8 HxWx3 (or a float tensor in [0, 1])"
        )
    return Image.fromarray(np.ascontiguousarray(arr))


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float [3, H, W] tensor in [0, 1] -> 8-bit RGB PIL image, rounding as diffusers' `numpy_to_pil` does."""
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise PrefalignError(f"image tensor of shape {tuple(x.shape)} is not [3, H, W]")
    if not x.is_floating_point():
        return _array_to_pil(x.detach().cpu().numpy())
    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return _array_to_pil(arr)


def load_rgb(image: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any supported image-like (path, PIL image, numpy array, tensor in [0, 1]) -> RGB PIL image."""
    if isinstance(image, (str, Path)):
        return open_image(image, max_pixels)
    if isinstance(image, Image.Image):
        return to_rgb(image, max_pixels)
    if isinstance(image, torch.Tensor):
        return to_rgb(tensor_to_pil(image), max_pixels)
    if isinstance(image, np.ndarray):
        return to_rgb(_array_to_pil(image), max_pixels)
    raise PrefalignError(
        f"unsupported image type {type(image).__name__}; pass a path, PIL image, array or tensor"
    )


def decode(image: Any, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Any image-like as a PIL image, files in their own mode (see `decode_file`); `to_rgb` finishes it."""
    if isinstance(image, (str, Path)):
        return decode_file(image, max_pixels)
    if isinstance(image, Image.Image):
        return image
    return load_rgb(image, max_pixels)


def list_image_files(directory: Path) -> list[Path]:
    """Image files directly inside `directory` (by suffix), sorted by name."""
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
