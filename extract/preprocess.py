"""Decode an image file and turn it into the network's input, exactly as the package says.

Order (docs/model-package.md): decode to uint8 BGR (``gray``: one channel) -> resize to ``resize``
(H, W) (``squash`` or ``shorter-side``) -> centre crop to ``crop`` -> reorder to ``channel_order``
-> float32 0..255 -> subtract ``mean`` (per channel, model order) or the mean image -> multiply by
``scale`` -> CHW (-> HW swapped when the package says ``transpose``, for MATLAB-trained nets such
as MTCNN).

The default is Caffe's own data path (``ReadImageToCVMat``): ``cv::imread`` (EXIF orientation
applied, ``IMREAD_GRAYSCALE`` for gray nets) then ``cv::resize`` with ``INTER_LINEAR`` on the uint8
image, as ``cv2.dnn.blobFromImages`` too. Ordinary 8-bit opaque files decode bit-identically to
``cv2.imread(path, IMREAD_COLOR)``; images Caffe would get wrong (alpha, 16-bit greyscale,
transparent palettes, CMYK without an Adobe marker) and anything OpenCV cannot read go through
PIL, converted to the same uint8 BGR. The work is split at uint8 (:meth:`Preprocess.load_uint8`)
so that normalising (:meth:`Preprocess.normalize`) can run on a whole batch, or on a GPU.

OpenCV and PIL release the GIL, so this runs in worker threads; OpenCV's own thread pool is
turned off (``cv2.setNumThreads(1)``) so those threads do not oversubscribe the cores.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# The decoder, resampling, EXIF and colour-conversion choices below change pixel values, so they
# are part of every cache key (bump when any of them changes).
IMPLEMENTATION = "cv2-exif/2"
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)

# graft decodes in its own worker threads; OpenCV's pool on top would oversubscribe the cores
# (and is slower for face-sized images even on one thread). A truncated PNG is reported through
# ImageError, not OpenCV's log.
cv2.setNumThreads(1)
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)

HW = tuple[int, int]
Resizer = Callable[[np.ndarray, HW], np.ndarray]


class ImageError(Exception):
    """One image could not be used; ``str(err)`` is the reason written to the failures file."""


# -- resizing -------------------------------------------------------------------------------------


def _cv2_resizer(interpolation: int) -> Resizer:
    """cv2.resize on the uint8 image (Caffe's ``cv::resize``; saturating, uint8 out)."""

    def resize(img: np.ndarray, hw: HW) -> np.ndarray:
        return cv2.resize(img, (hw[1], hw[0]), interpolation=interpolation)

    return resize


def _pil_resizer(resample: int) -> Resizer:
    """PIL's resize (antialiased when downscaling): graft's resampling before Caffe-exact mode."""

    def resize(img: np.ndarray, hw: HW) -> np.ndarray:
        return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), resample))

    return resize


#: ``resize_filter`` name -> function (uint8 H x W [x C], (H, W)) -> uint8 resized image
RESIZE_FILTERS: dict[str, Resizer] = {
    "linear": _cv2_resizer(cv2.INTER_LINEAR),  # Caffe, cv2.dnn.blobFromImage(s)
    "area": _cv2_resizer(cv2.INTER_AREA),
    "cubic": _cv2_resizer(cv2.INTER_CUBIC),
    "pil-bilinear": _pil_resizer(Image.BILINEAR),  # graft's default before IMPLEMENTATION cv2-exif/2
    "pil-bicubic": _pil_resizer(Image.BICUBIC),
    "pil-lanczos": _pil_resizer(Image.LANCZOS),
}


def _squash(h: int, w: int, target: HW) -> HW:
    """Caffe's resize: exactly the target, aspect ignored."""
    return target


def _cover(h: int, w: int, target: HW) -> HW:
    """The smallest aspect-preserving size that covers ``target`` (then centre-cropped to it):
    ``resize: 256`` gives torchvision's Resize(256) + CenterCrop(256)."""
    th, tw = target
    if th * w >= tw * h:  # the height is the binding side
        return th, max(tw, w * th // h)
    return max(th, h * tw // w), tw


#: ``resize_mode`` name -> (image h, w, target (H, W)) -> size the image is resized to
RESIZE_MODES: dict[str, Callable[[int, int, HW], HW]] = {"squash": _squash, "shorter-side": _cover}


def crop_offsets(hw: HW, size: HW, where: tuple[float, float] | None = None) -> HW:
    """(top, left) of a ``size`` crop of an ``hw`` image: Caffe's centre ``(h - ch) // 2``, or, for
    ``where`` (fractions in [0, 1)), uniform over the positions that fit (Caffe's random crop)."""
    (h, w), (ch, cw) = hw, size
    if h < ch or w < cw:
        raise ImageError(f"image {w}x{h} is smaller than the {cw}x{ch} crop")
    if where is None:
        return (h - ch) // 2, (w - cw) // 2
    return min(int(where[0] * (h - ch + 1)), h - ch), min(int(where[1] * (w - cw + 1)), w - cw)


def crop_image(img: np.ndarray, size: HW, where: tuple[float, float] | None = None) -> np.ndarray:
    """A ``size`` (H, W) crop of an H x W [x C] image; centre unless ``where`` is given."""
    top, left = crop_offsets(img.shape[:2], size, where)
    return img[top : top + size[0], left : left + size[1]]


# -- the resolved preprocessing --------------------------------------------------------------


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


def _choice(d: Mapping[str, Any], key: str, choices: Mapping[str, Any], default: str) -> str:
    """``d[key]`` (None: ``default``), checked against the registry's names."""
    value = str(d.get(key) or default).lower()
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


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
    resize_filter: str = "linear"
    fast_decode: bool = False
    resize_mode: str = "squash"

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
            resize_filter=_choice(d, "resize_filter", RESIZE_FILTERS, "linear"),
            fast_decode=bool(d.get("fast_decode", False)),
            resize_mode=_choice(d, "resize_mode", RESIZE_MODES, "squash"),
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
            "resize_filter": self.resize_filter,
            "fast_decode": self.fast_decode,
            "resize_mode": self.resize_mode,
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

    def resized_size(self, h: int, w: int) -> HW:
        """Size an ``h`` x ``w`` decoded image is resized to (before any crop)."""
        target = self._decode_target()
        return (h, w) if target is None else RESIZE_MODES[self.resize_mode](h, w, target)

    def load(self, path: str | Path) -> np.ndarray:
        """File -> float32 CHW network input. Raises :class:`ImageError` with a short reason."""
        return self.normalize(self.load_uint8(path)[None])[0]

    def load_uint8(self, path: str | Path) -> np.ndarray:
        """File -> uint8 (H, W, C) after decode, resize and centre crop, in the model's channel order."""
        return self._centre_crop(self.load_pixels(path))

    def load_pixels(self, path: str | Path) -> np.ndarray:
        """File -> uint8 (H, W, C) after decode and resize, not yet cropped (training crops at random)."""
        reduce_for = self.resized_size if self.fast_decode else None
        return self.fit(decode(path, gray=self.channel_order == "gray", reduce_for=reduce_for))

    def fit(self, img: np.ndarray) -> np.ndarray:
        """Decoded image (as :func:`decode` gives) -> resized uint8 (H, W, C), model channel order.

        ``shorter-side`` resizes to cover the target, then takes its centre."""
        hw = self.resized_size(*img.shape[:2])
        if hw != img.shape[:2]:
            img = RESIZE_FILTERS[self.resize_filter](img, hw)
        target = self._decode_target()
        if target is not None and hw != target:
            img = crop_image(img, target)
        return self._model_order(img)

    def _model_order(self, img: np.ndarray) -> np.ndarray:
        """BGR (or single-channel) H x W [x C] -> H x W x C in the model's channel order."""
        if img.ndim == 2:
            img = img[:, :, None]
        if self.channel_order == "gray" and img.shape[2] == 3:
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_BGR2GRAY)[:, :, None]
        elif self.channel_order == "rgb":
            img = img[:, :, ::-1]
        elif self.channel_order == "bgr" and img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        return img

    def _centre_crop(self, img: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(img if self.crop is None else crop_image(img, self.crop))

    def transform(self, img: np.ndarray) -> np.ndarray:
        """Decoded uint8 image (as :func:`decode` gives) -> float32 CHW (resize, crop, order, mean, scale)."""
        return self.normalize(self._centre_crop(self.fit(img))[None])[0]

    def normalize(self, batch: np.ndarray) -> np.ndarray:
        """uint8 (N, H, W, C), model channel order -> float32 (N, C, H, W): mean, scale, layout.

        Elementwise the same float32 operations whatever N, so a batch equals its images one by one."""
        if batch.ndim != 4 or batch.shape[3] != self.channels:
            raise ValueError(f"normalize takes (N, H, W, {self.channels}) images, got {batch.shape}")
        x = batch.astype(np.float32)
        if self.mean is not None:
            x = x - np.asarray(self.mean, dtype=np.float32)
        x = x.transpose(0, 3, 1, 2)
        if self.mean_image is not None:
            x = x - _fit_mean(self.mean_image, x.shape[2:])
        if self.scale != 1.0:
            x = x * np.float32(self.scale)
        if self.transpose:
            x = x.transpose(0, 1, 3, 2)
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


# -- decoding -----------------------------------------------------------------------------------

#: PIL modes OpenCV's IMREAD_COLOR / IMREAD_GRAYSCALE decode as Caffe would and as PIL's RGB
#: conversion does (checked for PNG, BMP, TIFF, GIF, WebP, PPM, JPEG)
_OPENCV_MODES = frozenset({"RGB", "L", "P", "1"})
#: (gray, DCT scale denominator) -> OpenCV's reduced-scale JPEG decode flag
_REDUCED = {
    (False, 2): cv2.IMREAD_REDUCED_COLOR_2, (False, 4): cv2.IMREAD_REDUCED_COLOR_4, (False, 8): cv2.IMREAD_REDUCED_COLOR_8,
    (True, 2): cv2.IMREAD_REDUCED_GRAYSCALE_2, (True, 4): cv2.IMREAD_REDUCED_GRAYSCALE_4, (True, 8): cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def _opencv_decodes(header: Image.Image | None) -> bool:
    """True when OpenCV's decode is the right one: opaque 8-bit images (what ``cv::imread`` gets
    right), Adobe CMYK JPEGs (OpenCV assumes Adobe's inverted CMYK), and what PIL cannot identify."""
    if header is None:
        return True
    if "transparency" in header.info:
        return False
    if header.mode == "CMYK":
        return header.format in ("JPEG", "MPO") and "adobe" in header.info
    return header.mode in _OPENCV_MODES


def _reduction(header: Image.Image | None, reduce_for: Callable[[int, int], HW] | None) -> int:
    """DCT scale denominator (1, 2, 4, 8) for a JPEG that stays >= the size it is resized to
    (PIL ``draft``'s rule, so the old fast path is reproduced); 1 for anything else."""
    if reduce_for is None or header is None or header.format not in ("JPEG", "MPO"):
        return 1
    w, h = header.size
    if header.getexif().get(0x0112, 1) in _ROTATING_ORIENTATIONS:
        w, h = h, w
    th, tw = reduce_for(h, w)
    room = min(h // th, w // tw)
    return next((s for s in (8, 4, 2) if room >= s), 1)


def _read(path: str | Path) -> bytes:
    """The file's bytes (OpenCV decodes from memory, so any path characters work)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError as err:
        raise ImageError("missing file") from err
    except IsADirectoryError as err:
        raise ImageError("is a folder") from err
    except OSError as err:
        raise ImageError(f"unreadable: {err.strerror or err}") from err
    if not data:
        raise ImageError("empty file")
    return data


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


def _pil_decode(header: Image.Image, gray: bool) -> np.ndarray:
    """The images OpenCV would get wrong: PIL decode, EXIF orientation, RGB -> uint8 BGR (or gray)."""
    header.load()
    rgb = _to_rgb(ImageOps.exif_transpose(header) or header)
    if gray:
        return np.asarray(rgb.convert("L"))  # ITU-R 601 luma, as OpenCV's BGR2GRAY
    return np.ascontiguousarray(np.asarray(rgb)[:, :, ::-1])


def decode(path: str | Path, gray: bool = False, reduce_for: Callable[[int, int], HW] | None = None) -> np.ndarray:
    """File -> uint8 H x W x 3 BGR (``gray``: H x W), EXIF orientation applied; :class:`ImageError`.

    ``reduce_for`` ((h, w) -> the size the image will be resized to) lets a JPEG decode at 1/2,
    1/4 or 1/8 scale while staying at least that size: much faster for big photos, not exact.
    """
    return decode_bytes(_read(path), gray, reduce_for)


def decode_bytes(data: bytes, gray: bool = False, reduce_for: Callable[[int, int], HW] | None = None) -> np.ndarray:
    """:func:`decode` of a file's bytes already read (a caller that hashed them reads once)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning, "palette images with transparency"
            try:
                header: Image.Image | None = Image.open(io.BytesIO(data))  # header only: mode, EXIF
            except UnidentifiedImageError:
                header = None  # maybe a format only OpenCV reads
            if _opencv_decodes(header):
                scale = _reduction(header, reduce_for)
                flag = _REDUCED[gray, scale] if scale > 1 else (cv2.IMREAD_GRAYSCALE if gray else cv2.IMREAD_COLOR)
                img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
                if img is not None:
                    return img
            if header is None:
                raise ImageError("not an image")
            return _pil_decode(header, gray)  # also says why OpenCV could not decode it
    except Image.DecompressionBombError as err:
        raise ImageError(f"too large: {err}") from err
    except (OSError, SyntaxError, ValueError, EOFError, cv2.error) as err:
        msg = str(err) or type(err).__name__
        reason = "truncated" if "truncat" in msg.lower() else "corrupt"
        raise ImageError(f"{reason}: {msg}") from err
