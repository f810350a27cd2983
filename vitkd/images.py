"""Decoding images into 8-bit RGB with their real value range, whatever the file or the data set row holds; a file that
cannot be decoded is a :class:`CorruptImage` (skipped and counted by the data sets, never guessed). Shared by the
folder data sets (:mod:`vitkd.data`) and the Hugging Face ones (:mod:`vitkd.hf_data`)."""
from __future__ import annotations

import struct

import numpy as np
from PIL import Image

__all__ = ['CorruptImage', 'to_rgb', 'load_image']


class CorruptImage(OSError):
    """An image file that cannot be decoded (corrupt, truncated, not an image, or over Pillow's pixel limit)."""


def _to_uint8(a: np.ndarray, full_scale: float) -> np.ndarray:
    return np.clip(np.rint(a.astype(np.float64) * (255.0 / full_scale)), 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB with its real value range, whatever its Pillow mode.

    Pillow's own ``convert('RGB')`` clips 16-bit and 32-bit integer images at 255 (most of a 16-bit scan turns white)
    and float images at 0..255, and drops alpha (transparent pixels keep whatever colour they hide). Here 16-bit
    images are scaled by 255/65535, 32-bit integer ones as 8-bit when their values fit, else as 16-bit when they fit,
    else by their min..max; float images as 0..1 when they fit, else 0..255 when they fit, else by their min..max
    (a float image with NaN or infinite pixels is a :class:`CorruptImage`: skipped and counted, never guessed);
    images with alpha (RGBA, LA, PA, a palette with transparency) are composited over white; CMYK, YCbCr, palette
    and 1-bit images go through Pillow's conversion.
    """
    mode = img.mode
    if mode.startswith('I;16') or mode in ('I', 'F'):
        a = np.asarray(img)
        if mode == 'F' and not np.isfinite(a).all():  # no value range to map them into: an unreadable image
            bad = int(a.size - np.isfinite(a).sum())
            raise CorruptImage(f'{bad} of its {a.size} float pixels are NaN or infinite')
        lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
        if mode.startswith('I;16'):
            gray = _to_uint8(a, 65535)
        elif mode == 'I' and lo >= 0 and hi <= 255:
            gray = a.astype(np.uint8)
        elif mode == 'I' and lo >= 0 and hi <= 65535:
            gray = _to_uint8(a, 65535)
        elif mode == 'F' and lo >= 0 and hi <= 1:
            gray = _to_uint8(a, 1.0)
        elif mode == 'F' and lo >= 0 and hi <= 255:
            gray = _to_uint8(a, 255.0)
        else:
            gray = _to_uint8(a.astype(np.float64) - lo, max(hi - lo, 1e-12))
        return Image.fromarray(gray, 'L').convert('RGB')
    if mode == 'P' and 'transparency' in img.info:
        img, mode = img.convert('RGBA'), 'RGBA'
    if mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La'):
        rgba = img.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return img if mode == 'RGB' else img.convert('RGB')


def load_image(path: str) -> Image.Image:
    """Decode an image file into RGB (:func:`to_rgb`); any decoding failure is a :class:`CorruptImage` naming why.

    Pillow's decompression-bomb guard (images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` pixels) is kept: such a file
    is skipped with a warning like a corrupt one (raise ``PIL.Image.MAX_IMAGE_PIXELS`` in code to read it).
    """
    try:
        with open(path, 'rb') as f:
            img = Image.open(f)
            img.load()
            return to_rgb(img)
    except Image.DecompressionBombError as e:
        raise CorruptImage(f'too large to decode safely: {e}') from None
    except CorruptImage:
        raise
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, struct.error) as e:
        raise CorruptImage(f'{type(e).__name__}: {e}') from None
