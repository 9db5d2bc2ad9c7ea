"""Decode an image file and turn it into the network's input, exactly as the package says.

Order (docs/model-package.md): decode to RGB -> squash-resize to ``resize`` (H, W) -> centre crop
to ``crop`` -> float32 0..255 -> reorder to ``channel_order`` (``gray``: luma) -> subtract ``mean`` (per channel,
model order) or the mean image -> multiply by ``scale`` -> CHW (-> HW swapped when the package
says ``transpose``, for MATLAB-trained nets such as MTCNN).

Pure PIL + numpy, so it runs in worker threads (PIL releases the GIL while decoding/resizing).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The resampling, EXIF and colour-conversion choices below change pixel values, so they are part
# of every cache key (bump when any of them changes).
IMPLEMENTATION = "pil-bilinear-draft-exif/1"
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)


class ImageError(Exception):
    """One image could not be used; ``str(err)`` is the reason written to the failures file."""


def _pair(value: Any, what: str) -> tuple[int, int] | None:
    """``None``/0 -> None; an int -> square; a 2-sequence -> (H, W)."""
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return None if value == 0 else (int(value), int(value))
    if isinstance(value, Sequence) and len(value) == 2:
        h, w = (int(v) for v in value)
        return None if h == 0 and w == 0 else (h, w)
    raise ValueError(f"{what}: expected an int or [H, W], got {value!r}")


@dataclass(frozen=True)
class Preprocess:
    """The resolved preprocessing of one model (after command-line overrides)."""

    channel_order: str = "bgr"
    mean: tuple[float, ...] | None = None
    mean_image: np.ndarray | None = field(default=None, repr=False, compare=False)
    scale: float = 1.0
    resize: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None
    input_size: tuple[int, int] | None = None
    transpose: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], mean_image: np.ndarray | None = None) -> Preprocess:
        """Build from a manifest ``preprocess`` dict; ``mean_image`` is the loaded ``mean_file``."""
        order = str(d.get("channel_order") or "bgr").lower()
        if order not in ("rgb", "bgr", "gray"):
            raise ValueError(f"channel_order must be rgb, bgr or gray, got {order!r}")
        channels = 1 if order == "gray" else 3
        mean = d.get("mean")
        if mean is not None and not isinstance(mean, Sequence):
            mean = [float(mean)] * 3
        if mean is not None and len(mean) == 1:
            mean = list(mean) * channels
        if mean is not None and len(mean) != channels:
            raise ValueError(f"mean must have 1 or {channels} values for channel_order {order}, got {mean!r}")
        if mean_image is not None:
            mean_image = np.asarray(mean_image, dtype=np.float32)
            if mean_image.ndim != 3 or mean_image.shape[0] != channels:
                raise ValueError(f"mean image must be ({channels}, H, W), got {mean_image.shape}")
        pp = cls(
            channel_order=order,
            mean=None if mean is None else tuple(float(m) for m in mean),
            mean_image=mean_image if mean is None else None,
            scale=float(d.get("scale") if d.get("scale") is not None else 1.0),
            resize=_pair(d.get("resize"), "resize"),
            crop=_pair(d.get("crop"), "crop"),
            input_size=_pair(d.get("input_size"), "input_size"),
            transpose=bool(d.get("transpose", False)),
        )
        out = pp.output_size()
        if pp.input_size is not None and out is not None and out != pp.input_size:
            raise ValueError(f"preprocessing gives {out[0]}x{out[1]} images but the network takes {pp.input_size[0]}x{pp.input_size[1]} (check --resize/--crop)")
        return pp

    @property
    def channels(self) -> int:
        return 1 if self.channel_order == "gray" else 3

    def input_shape(self) -> tuple[int, int, int] | None:
        """(C, H, W) of one preprocessed image (after any transpose); None if image-dependent."""
        hw = self.output_size()
        if hw is None:
            return None
        return (self.channels, hw[1], hw[0]) if self.transpose else (self.channels, *hw)

    def output_size(self) -> tuple[int, int] | None:
        """(H, W) of the array fed to the net before any transpose; None if image-dependent."""
        if self.crop is not None:
            return self.crop
        return self.resize if self.resize is not None else self.input_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-able description, with the mean image replaced by its sha256 (used in cache keys)."""
        mean_image_sha = None
        if self.mean_image is not None:
            mean_image_sha = hashlib.sha256(np.ascontiguousarray(self.mean_image, dtype="<f4").tobytes()).hexdigest()
        return {
            "channel_order": self.channel_order,
            "mean": None if self.mean is None else list(self.mean),
            "mean_image_sha256": mean_image_sha,
            "scale": self.scale,
            "resize": None if self.resize is None else list(self.resize),
            "crop": None if self.crop is None else list(self.crop),
            "input_size": None if self.input_size is None else list(self.input_size),
            "transpose": self.transpose,
            "implementation": IMPLEMENTATION,
        }

    # -- the transforms -------------------------------------------------------------------

    def _decode_target(self) -> tuple[int, int] | None:
        """(H, W) the decoded image is first brought to: ``resize``, else the crop/input size."""
        if self.resize is not None:
            return self.resize
        if self.crop is None:
            return self.input_size
        return None

    def load(self, path: str | Path) -> np.ndarray:
        """File -> float32 CHW network input. Raises :class:`ImageError` with a short reason."""
        img = decode(path, self._decode_target())
        return self.transform(img)

    def transform(self, img: Image.Image) -> np.ndarray:
        """RGB PIL image -> float32 CHW array (resize, crop, channel order, mean, scale)."""
        target = self._decode_target()
        if target is not None and (img.height, img.width) != target:
            img = img.resize((target[1], target[0]), Image.BILINEAR)
        if self.crop is not None:
            ch, cw = self.crop
            if img.height < ch or img.width < cw:
                raise ImageError(f"image {img.width}x{img.height} is smaller than the {cw}x{ch} crop")
            top, left = (img.height - ch) // 2, (img.width - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        if self.channel_order == "gray":
            img = img.convert("L")  # ITU-R 601 luma, as OpenCV's IMREAD_GRAYSCALE
        x = np.asarray(img, dtype=np.float32)  # H, W, 3 in RGB (or H, W for gray), 0..255
        if x.ndim == 2:
            x = x[:, :, None]
        if self.channel_order == "bgr":
            x = x[:, :, ::-1]
        if self.mean is not None:
            x = x - np.asarray(self.mean, dtype=np.float32)
        x = x.transpose(2, 0, 1)
        if self.mean_image is not None:
            x = x - _fit_mean(self.mean_image, x.shape[1:])
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        if self.transpose:
            x = x.transpose(0, 2, 1)
        return np.ascontiguousarray(x, dtype=np.float32)


def _fit_mean(mean_image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Centre crop of the mean image to ``hw`` (Caffe crops mean and data at the same offset)."""
    mh, mw = mean_image.shape[1:]
    h, w = hw
    if (mh, mw) == (h, w):
        return mean_image
    if mh < h or mw < w:
        raise ImageError(f"mean image {mh}x{mw} is smaller than the input {h}x{w}")
    top, left = (mh - h) // 2, (mw - w) // 2
    return mean_image[:, top : top + h, left : left + w]


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB: greyscale, palette, CMYK, alpha (over white) and 16-bit."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's own convert() clips 16-bit values at 255 instead of scaling them: scale by hand.
        a = np.asarray(img).astype(np.float64)
        top = 1.0 if mode == "F" and a.max(initial=0) <= 1.0 else (255.0 if a.max(initial=0) <= 255 else 65535.0)
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode == "P" and "transparency" in img.info or mode in ("PA", "LA", "RGBA", "La", "RGBa"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK (PIL un-inverts Adobe CMYK JPEGs), YCbCr, LAB, HSV


def decode(path: str | Path, target_hw: tuple[int, int] | None = None) -> Image.Image:
    """Open, apply EXIF orientation, convert to RGB; JPEGs decoded at reduced scale when larger.

    ``draft`` lets libjpeg decode at 1/2, 1/4 or 1/8 scale while staying at least ``target_hw``,
    which is much faster for big photos; the final resize then does the exact squash.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "palette images with transparency"
            img = Image.open(path)
            if target_hw is not None and img.format == "JPEG":
                h, w = target_hw
                orientation = img.getexif().get(0x0112, 1)
                if orientation in _ROTATING_ORIENTATIONS:
                    h, w = w, h
                img.draft(img.mode if img.mode in ("RGB", "L") else None, (w, h))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except FileNotFoundError as err:
        raise ImageError("missing file") from err
    except UnidentifiedImageError as err:
        raise ImageError("empty file" if Path(path).stat().st_size == 0 else "not an image") from err
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        msg = str(err) or type(err).__name__
        reason = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageError(f"{reason}: {msg}") from err
