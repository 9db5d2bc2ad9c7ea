"""Where the images come from: a folder, a CSV, or a Caffe list file, as one table of records.

Every source becomes the same :class:`pandas.DataFrame`: ``path`` (absolute, so two roots can
never collide in a cache index), ``rel_path`` (as written in the source, for portability),
``source`` (which input the row came from) and the label columns that came with the input.
Nothing here opens an image: missing or unreadable files are the pipeline's failures, so a
bad row never stops a run.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pandas as pd

from convert.errors import GraftError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm", ".pnm"}
)
PATH_COLUMN_GUESSES = ("path", "file", "filename", "file_name", "image", "image_path", "image_name", "image_names", "img",
                       "img_path", "imagepath", "file_path", "filepath", "full_path", "relative_path", "rel_path", "photo")
RESERVED_COLUMNS = ("path", "rel_path", "sha256", "source")


def guess_path_column(columns) -> str | None:
    """The column of a labels table that names the image: a common name (``path``, ``file``,
    ``image_names``, ...), matched exactly, then ignoring case, spaces, ``-`` and ``_``."""
    cols = [str(c) for c in columns]
    for c in PATH_COLUMN_GUESSES:
        if c in cols:
            return c
    loose = {"".join(ch for ch in c.lower() if ch.isalnum()): c for c in reversed(cols)}
    for c in PATH_COLUMN_GUESSES:
        hit = loose.get(c.replace("_", ""))
        if hit is not None:
            return hit
    return None


class SourceError(GraftError, ValueError):
    """Bad input description (no such column, empty folder, malformed line); one-line message.

    A :class:`GraftError`, so the command line reports it as bad input wherever it is raised."""


def _unreadable(path: Path, flag: str, err: BaseException) -> SourceError:
    """Why ``path`` (given as ``flag``) cannot be read, as one line naming both."""
    if isinstance(err, IsADirectoryError) or path.is_dir():
        why = "is a directory, expected a file"
    elif isinstance(err, FileNotFoundError):
        why = "no such file"
    elif isinstance(err, PermissionError):
        why = "permission denied"
    elif isinstance(err, UnicodeDecodeError):
        why = f"not a text file (byte {err.start} is not UTF-8)"
    elif isinstance(err, OSError):
        why = err.strerror or str(err)
    else:
        why = " ".join(str(err).split())[:200]
    return SourceError(f"{flag} {path}: {why}")


def read_text_file(path: str | os.PathLike, flag: str) -> str:
    """The text of ``path``; missing, a directory, unreadable or binary: one error naming it."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, flag, err) from None


def read_csv_file(path: str | os.PathLike, flag: str = "--csv") -> pd.DataFrame:
    """``path`` as a table; missing, a directory, unreadable, binary, empty or malformed: one
    :class:`SourceError` naming the flag and the file, never pandas' traceback."""
    path = Path(path)
    try:
        df = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise SourceError(f"{flag} {path}: empty file (expected a header row, then one row per image)") from None
    except pd.errors.ParserError as err:
        detail = " ".join(str(err).split())[:200]
        raise SourceError(f"{flag} {path}: not a valid CSV ({detail})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise _unreadable(path, flag, err) from None
    if df.empty:
        raise SourceError(f"{flag} {path}: a header but no rows")
    return df


def _absolute(root: Path, rel: str) -> str:
    """Absolute, normalised path of ``rel`` under ``root`` (symlinks kept as the user named them)."""
    p = Path(os.path.expanduser(rel))
    return os.path.normpath(p if p.is_absolute() else Path(root) / p)


def from_folder(folder: str | os.PathLike) -> pd.DataFrame:
    """All images under ``folder`` (recursive, sorted); the containing sub-folder is the class.

    ``label`` is the name of the image's own folder and ``folder`` its folder relative to the root
    (``gender-data/train/female``), so splits encoded in the tree stay available. Hidden files and
    folders are skipped. Images directly in the root get an empty label.
    """
    root = Path(folder)
    if not root.is_dir():
        raise SourceError(f"--images {folder}: not a folder")
    rows = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_EXTENSIONS:
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            rows.append(
                {
                    "path": _absolute(root, rel),
                    "rel_path": Path(rel).as_posix(),
                    "label": None if rel_dir == "." else Path(rel_dir).name,
                    "folder": "" if rel_dir == "." else Path(rel_dir).as_posix(),
                }
            )
    if not rows:
        raise SourceError(f"--images {folder}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found")
    df = pd.DataFrame(rows)
    if df["label"].isna().all():
        df = df.drop(columns=["label", "folder"])
    df.insert(2, "source", str(folder))
    return df


def from_csv(csv: str | os.PathLike, path_column: str | None = None, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Rows of a CSV; ``path_column`` names the image (guessed from common names when omitted).

    Every other column is kept as a label column. Relative paths resolve against ``root``, by
    default the CSV's own folder (where such files usually live next to the images).
    """
    csv = Path(csv)
    df = read_csv_file(csv, "--csv")
    if path_column is None:
        path_column = guess_path_column(df.columns)
        if path_column is None:
            raise SourceError(f"{csv}: no --path-column given and none of {list(PATH_COLUMN_GUESSES)} present; columns: {list(df.columns)}")
    if path_column not in df.columns:
        raise SourceError(f"{csv}: no column {path_column!r}; columns: {list(df.columns)}")
    base = Path(root) if root is not None else csv.parent
    rel = df[path_column].astype("string")
    if rel.isna().any():
        raise SourceError(f"{csv}: column {path_column!r} is empty in row(s) {list(df.index[rel.isna()][:5] + 2)}")
    labels = df.drop(columns=[path_column])
    clash = [c for c in labels.columns if c in RESERVED_COLUMNS]
    labels = labels.rename(columns={c: f"label_{c}" for c in clash})
    out = pd.DataFrame(
        {
            "path": [_absolute(base, r) for r in rel],
            "rel_path": rel.astype(str).tolist(),
            "source": str(csv),
        }
    )
    return pd.concat([out, labels.reset_index(drop=True)], axis=1)


def from_list(list_file: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """A Caffe ImageData list: ``relative/path.jpg 3`` per line; the label is an integer.

    As in Caffe, the label follows the *last* space, so paths may contain spaces; a line with a
    single token has no label. Blank lines and ``#`` comments are skipped. Relative paths resolve
    against ``root``, by default the list file's folder.
    """
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    rels, labels = [], []
    for lineno, raw in enumerate(read_text_file(list_file, "--list").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        head, _, tail = line.rpartition(" ")
        if head and tail.lstrip("-").isdigit():
            rels.append(head.strip())
            labels.append(int(tail))
        elif not head:
            rels.append(line)
            labels.append(None)
        else:
            raise SourceError(f"--list {list_file}:{lineno}: expected 'path label' with an integer label, got {raw!r}")
    if not rels:
        raise SourceError(f"--list {list_file}: no entries")
    df = pd.DataFrame({"path": [_absolute(base, r) for r in rels], "rel_path": rels, "source": str(list_file)})
    if any(lab is not None for lab in labels):
        df["label"] = pd.array(labels, dtype="Int64")
    return df


def dataset_name(images: str | None = None, csv: str | None = None, list_file: str | None = None) -> str:
    """The default dataset name of an input: the folder's name, or the CSV's / list file's stem
    (``data/faces/train`` -> ``train``, ``labels.csv`` -> ``labels``), made file-name safe."""
    given = images or csv or list_file
    if not given:
        raise SourceError("give exactly one of --images, --csv, --list")
    p = Path(os.path.abspath(os.path.expanduser(given)))
    stem = p.name if images else p.stem
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-") or "dataset"
    return name[:128]


def input_source(images: str | None = None, csv: str | None = None, list_file: str | None = None) -> str:
    """Absolute path of the input, what a dataset records as where it came from."""
    return os.path.abspath(os.path.expanduser(images or csv or list_file or ""))


def load_records(
    images: str | None = None,
    csv: str | None = None,
    list_file: str | None = None,
    root: str | None = None,
    path_column: str | None = None,
) -> pd.DataFrame:
    """Exactly one of ``images`` / ``csv`` / ``list_file`` as a record table."""
    given = [name for name, v in (("--images", images), ("--csv", csv), ("--list", list_file)) if v]
    if len(given) != 1:
        raise SourceError(f"give exactly one of --images, --csv, --list (got {', '.join(given) or 'none'})")
    if images:
        if root is not None:
            raise SourceError("--root applies to --csv and --list; --images is its own root")
        return from_folder(images)
    if path_column is not None and not csv:
        raise SourceError("--path-column applies to --csv only")
    if csv:
        return from_csv(csv, path_column, root)
    return from_list(list_file, root)  # type: ignore[arg-type]
