"""A converted detector package as a callable: RGB photos in, the package's output blobs out.

Preprocessing is the package manifest's (``extract.preprocess.Preprocess``), so a detector
converted with the right preset needs no pixel code of its own; inference is
``extract.backends`` (onnxruntime on CPU by default, torch on CUDA when asked).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from convert.errors import GraftError


class PackageNet:
    """``net(images) -> {blob: array}`` for a batch of RGB uint8 (H, W, 3) photos."""

    def __init__(self, pkg: Any, blobs: Sequence[str], *, device: str = "cpu", backend: str = "auto") -> None:
        from extract.backends import BackendError, make_backend
        from extract.preprocess import Preprocess

        self.pkg = pkg
        self.blobs = list(blobs)
        try:
            self.pre = Preprocess.from_dict(pkg.preprocess or {}, pkg.mean_image())
            self.backend = make_backend(pkg, self.blobs, backend, device, "fp32")
        except (BackendError, ValueError) as err:
            raise GraftError(f"--detector {pkg.name}: {err}") from None
        if self.pre.output_size() is None:
            raise GraftError(f"--detector {pkg.name}: the package has no fixed input size")
        # the photos come RGB: a Preprocess of the opposite channel order gives a 3-channel model its
        # order without first copying each full-size photo to BGR (resizing is per channel)
        swap = {"rgb": "bgr", "bgr": "rgb"}.get(self.pre.channel_order)
        self._rgb_pre = dataclasses.replace(self.pre, channel_order=swap) if swap else None

    @property
    def input_hw(self) -> tuple[int, int]:
        """(H, W) every photo is squashed to."""
        return self.pre.output_size()  # type: ignore[return-value]

    def inputs(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """RGB uint8 photos -> the float32 NCHW batch the package expects: each photo resized (and
        cropped) as uint8, then normalised as one batch (``Preprocess.normalize``: the same float32
        operations as photo by photo, so equal to ``pre.transform`` of each BGR photo)."""
        if self._rgb_pre is None:  # gray
            return np.stack([self.pre.transform(np.ascontiguousarray(im[:, :, ::-1])) for im in images])
        pre = self._rgb_pre
        return pre.normalize(np.stack([pre._centre_crop(pre.fit(im)) for im in images]))

    def __call__(self, images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return self.backend.run(self.inputs(images))
