"""The preprocessing a Caffe model expects, as recorded in the package manifest.

Caffe models expect BGR pixels 0..255 with a mean subtracted and no std division unless
their recipe says otherwise. ``extract`` applies exactly this; the order is fixed:
squash-resize -> centre crop -> channel order -> subtract mean -> multiply by scale.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import GraftError


def parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise GraftError(f"{what}: expected comma-separated numbers, got '{text}'") from None


def parse_size(text: str | None, what: str) -> list[int] | None:
    """'224' -> [224, 224]; '240,320' -> [240, 320] (H, W); None/'0' -> None."""
    if text in (None, "", "0"):
        return None
    vals = parse_floats(str(text), what)
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or any(v <= 0 or v != int(v) for v in vals):
        raise GraftError(f"{what}: expected H or H,W positive integers, got '{text}'")
    return [int(vals[0]), int(vals[1])]


def read_mean_file(path: str | Path) -> np.ndarray:
    """A ``.binaryproto`` mean (BlobProto, 1×C×H×W) or a ``.npy`` (C×H×W) as float32 (C, H, W)."""
    path = Path(path)
    if not path.is_file():
        raise GraftError(f"{path}: mean file not found")
    if path.suffix == ".npy":
        try:
            arr = np.asarray(np.load(path), dtype=np.float32)
        except (ValueError, EOFError, TypeError):  # not an .npy, truncated, or not numbers
            raise GraftError(f"{path}: not a .npy mean image") from None
    else:
        from .proto import pb

        blob = pb.BlobProto()
        try:
            blob.ParseFromString(path.read_bytes())
        except Exception:
            raise GraftError(f"{path}: not a .binaryproto mean file") from None
        shape = list(blob.shape.dim) or [blob.num, blob.channels, blob.height, blob.width]
        data = np.asarray(blob.data, dtype=np.float32) if len(blob.data) else np.asarray(blob.double_data, dtype=np.float32)
        if data.size == 0 or int(np.prod(shape)) != data.size:
            raise GraftError(f"{path}: mean blob shape {shape} does not match its {data.size} values")
        arr = data.reshape(shape)
    if arr.ndim == 4:
        arr = arr[0]
    if arr.ndim != 3:
        raise GraftError(f"{path}: expected a C×H×W mean image, got shape {arr.shape}")
    return arr


def centre_crop_chw(arr: np.ndarray, size: tuple[int, int], what: str) -> np.ndarray:
    h, w = arr.shape[-2:]
    th, tw = size
    if h < th or w < tw:
        raise GraftError(f"{what}: mean image {h}x{w} is smaller than the input {th}x{tw}")
    top, left = (h - th) // 2, (w - tw) // 2
    return np.ascontiguousarray(arr[..., top:top + th, left:left + tw])


def build_preprocess(
    input_shape: list[int],
    *,
    mean: str | list[float] | None = None,
    mean_file: str | None = None,
    scale: float | None = None,
    channel_order: str | None = None,
    resize: str | list[int] | None = None,
    crop: int | None = None,
    defaults: dict | None = None,
) -> tuple[dict, np.ndarray | None]:
    """Merge flags over preset ``defaults``; return (manifest dict, mean image or None)."""
    d = dict(defaults or {})
    if len(input_shape) != 4:
        raise GraftError(f"input shape {input_shape} is not N×C×H×W; image preprocessing needs a 4-D input")
    channels, h, w = input_shape[1:]
    default_order = {1: "gray", 3: "bgr"}.get(channels, "none")  # "none": not an image input
    order = (channel_order or d.get("channel_order") or default_order).lower()
    if order not in ("bgr", "rgb", "gray", "none"):
        raise GraftError(f"--channel-order: expected bgr, rgb or gray, got '{order}'")
    if (order == "gray") != (channels == 1):
        raise GraftError(f"--channel-order {order} does not fit a {channels}-channel input")
    mean_vals = parse_floats(mean, "--mean") if isinstance(mean, str) else (mean if mean is not None else d.get("mean"))
    if mean_vals is not None:
        if len(mean_vals) == 1:
            mean_vals = mean_vals * channels
        if len(mean_vals) != channels:
            raise GraftError(f"--mean: {len(mean_vals)} values for a {channels}-channel input")
        mean_vals = [float(v) for v in mean_vals]
    crop_n = int(crop if crop is not None else d.get("crop", 0) or 0)
    rs = parse_size(resize, "--resize") if isinstance(resize, str) else (resize or d.get("resize"))
    if crop_n and not rs:
        raise GraftError("--crop needs --resize (resize first, then take the centre crop)")
    if not rs:
        rs = [h, w]
    final = [crop_n, crop_n] if crop_n else list(rs)
    if final != [h, w]:
        raise GraftError(f"preprocessing yields {final[0]}x{final[1]} images but the net's input is {h}x{w}; "
                         f"set --resize/--crop or --input-size")
    mean_img = None
    if mean_file:
        if mean_vals is not None:
            raise GraftError("give --mean or --mean-file, not both")
        mean_img = read_mean_file(mean_file)
        if mean_img.shape[0] != channels:
            raise GraftError(f"{mean_file}: mean has {mean_img.shape[0]} channels, the input {channels}")
        mean_img = centre_crop_chw(mean_img, (h, w), str(mean_file))
    spec = {
        "channel_order": order,
        "mean": mean_vals,
        "mean_file": "mean.npy" if mean_img is not None else None,
        "scale": float(scale if scale is not None else d.get("scale", 1.0)),
        "resize": [int(v) for v in rs],
        "crop": crop_n,
        "input_size": [h, w],
    }
    if d.get("transpose"):  # MATLAB-trained nets (MTCNN): extract swaps H and W after normalising
        spec["transpose"] = True
    return spec, mean_img


def random_inputs(shape: list[int], pre: dict, mean_img: np.ndarray | None, seed: int = 0) -> np.ndarray:
    """Random 'images' (uniform 0..255) run through the mean/scale step: realistic net inputs."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 255, size=shape).astype(np.float32)
    if mean_img is not None:
        x -= mean_img[None]
    elif pre.get("mean") is not None:
        x -= np.asarray(pre["mean"], np.float32).reshape(1, -1, 1, 1)
    return (x * np.float32(pre.get("scale", 1.0))).astype(np.float32)
