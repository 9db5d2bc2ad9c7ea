"""The output folder of ``graft faces``: crops, one record per photo, ``faces.csv``, ``failures.csv``.

Layout under ``--out``::

    settings.json                 what the crops depend on (detector packages, thresholds, margin,
                                  size, align, largest); a run with other settings is refused
    crops/<sha[:2]>/<sha>_<k>.jpg face k of the photo whose bytes hash to <sha> (JPEG quality 95)
    records/<sha[:2]>/<sha>.json  the photo's faces (or why it has none), written after its crops
    faces.csv, failures.csv       rebuilt from the records at the end of every run (and on Ctrl-C)

A photo is done when its record exists: a re-run reads it instead of detecting again, whatever
the photo's path. Each file goes through a temporary name and ``os.replace``, the record last,
so a kill leaves at worst crops without a record, which the next run rewrites. They are not
fsync'd one by one (two fsyncs a photo cost more than detecting it); instead a record names
each crop's byte size and a record whose crops do not match is not done (a power loss).

Refusing other settings, rather than keying a sub-folder per setting, keeps one ``--out`` one
dataset: ``faces.csv`` and the crop paths ``extract`` reads never depend on which run wrote them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from convert.errors import GraftError
from extract.cache import _atomic_write_bytes

from .types import LANDMARKS, Face

JPEG_QUALITY = 95
LANDMARK_COLUMNS = [f"{name}_{axis}" for name in LANDMARKS for axis in ("x", "y")]
FACE_COLUMNS = ["path", "photo", "photo_rel_path", "photo_sha256", "face", "x1", "y1", "x2", "y2", "score",
                *LANDMARK_COLUMNS, "detector"]
#: record columns that are bookkeeping, not labels carried over to faces.csv
SOURCE_COLUMNS = ("path", "rel_path", "source")


class FacesFolder:
    """``--out``: checks the settings, writes one photo's crops and record, rebuilds the tables."""

    def __init__(self, out: str | Path, settings: dict[str, Any]) -> None:
        self.dir = Path(out)
        self.settings = settings
        if self.dir.exists() and not self.dir.is_dir():
            raise GraftError(f"--out {self.dir}: exists and is not a folder")
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_settings()

    def _check_settings(self) -> None:
        path = self.dir / "settings.json"
        if not path.is_file():
            _atomic_write_bytes(path, lambda f: f.write((json.dumps(self.settings, indent=1) + "\n").encode()))
            return
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise GraftError(f"--out {self.dir}: unreadable settings.json ({err})") from None
        if old != self.settings:
            diff = [k for k in sorted(set(old) | set(self.settings)) if old.get(k) != self.settings.get(k)]
            said = ", ".join(f"{k} {_short(old.get(k))} -> {_short(self.settings.get(k))}" for k in diff)
            raise GraftError(f"--out {self.dir} holds crops made with other settings ({said}); "
                             f"give another --out, or delete that folder to start again")

    def record_path(self, sha: str) -> Path:
        return self.dir / "records" / sha[:2] / f"{sha}.json"

    def crop_rel(self, sha: str, k: int) -> str:
        return f"crops/{sha[:2]}/{sha}_{k}.jpg"

    def read_record(self, sha: str) -> dict | None:
        """The photo's record, or None when it is not done: absent, torn, or a crop it names is not
        there with the size it was written with (crops and records are not fsync'd one by one: a
        power loss can leave a renamed file empty, and this check makes the next run redo it)."""
        try:
            record = json.loads(self.record_path(sha).read_text())
            for face in record["faces"]:
                if "bytes" in face and (self.dir / face["path"]).stat().st_size != face["bytes"]:
                    return None
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return record

    def write(self, sha: str, shape: tuple[int, ...], faces: list[Face], crops: list[np.ndarray],
              failure: str | None = None) -> dict:
        """Write the crops (RGB uint8), then the record; returns the record."""
        rows = []
        for k, (face, crop) in enumerate(zip(faces, crops)):
            rel = self.crop_rel(sha, k)
            target = self.dir / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            ok, data = cv2.imencode(".jpg", np.ascontiguousarray(crop[:, :, ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
            if not ok:
                raise OSError(f"{target}: JPEG encoding failed")
            _atomic_write_bytes(target, lambda f, d=data: f.write(d.tobytes()), fsync=False)
            rows.append({"path": rel, "bytes": int(data.size), "face": k, "box": [round(float(v), 2) for v in face.box], "score": round(face.score, 5),
                         "landmarks": None if face.landmarks is None else np.round(face.landmarks, 2).tolist()})
        record = {"sha256": sha, "height": int(shape[0]), "width": int(shape[1]), "faces": rows, "failure": failure}
        path = self.record_path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(path, lambda f: f.write(json.dumps(record).encode()), fsync=False)
        return record

    def write_tables(self, done: list[tuple[dict, dict]], failures: list[tuple[str, str]], detector: str) -> pd.DataFrame:
        """``faces.csv`` (one row per face of each (source row, record) in ``done``, label columns
        after the fixed ones) and ``failures.csv`` (path, reason), atomically; returns faces."""
        rows = []
        for src, rec in done:
            labels = {k: v for k, v in src.items() if k not in SOURCE_COLUMNS}
            for f in rec["faces"]:
                lm = f["landmarks"] or [[None, None]] * len(LANDMARKS)
                row = {"path": f["path"], "photo": src["path"], "photo_rel_path": src.get("rel_path"),
                       "photo_sha256": rec["sha256"], "face": f["face"], **dict(zip(("x1", "y1", "x2", "y2"), f["box"])),
                       "score": f["score"], **dict(zip(LANDMARK_COLUMNS, (v for p in lm for v in p))), "detector": detector}
                rows.append({**row, **{k: v for k, v in labels.items() if k not in row}})
        table = pd.DataFrame(rows, columns=None if rows else FACE_COLUMNS)
        _atomic_write_bytes(self.dir / "faces.csv", lambda f: f.write(table.to_csv(index=False).encode()))
        fail = pd.DataFrame(failures, columns=["path", "reason"])
        _atomic_write_bytes(self.dir / "failures.csv", lambda f: f.write(fail.to_csv(index=False).encode()))
        return table


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."
