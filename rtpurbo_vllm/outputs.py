"""Atomic output files of the calibration, evaluation and benchmark commands: text, JSON, CSV,
markdown, PNG and staged folders.

Every file is written to a hidden temporary sibling, flushed and renamed into place, so an
interrupted run leaves either the old file or the new one, never half of one. Errors a user can fix
(an unwritable folder) raise ``ValueError`` naming the folder.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Creates the folder ``path`` (with parents) and checks it is writable.

    Raises:
        ValueError: it cannot be created or written.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise ValueError(f"output folder {path} is not writable ({exc.strerror or exc}); fix: choose a writable "
                         f"folder or fix its permissions") from exc
    return path


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Checks, without creating anything, that the folder ``path`` can be written: it is a writable
    folder, or its nearest existing ancestor is one (so that it can be created). For the commands that
    write only after a long run, so that a bad output path fails before the work.

    Raises:
        ValueError: ``path`` or an ancestor is a file (or a dangling link), or the folder is read-only.
    """
    path = Path(path).absolute()
    existing = path
    while not os.path.lexists(existing):
        existing = existing.parent
    if not existing.is_dir():
        what = "is a dangling link" if existing.is_symlink() else "is a file"
        raise ValueError(f"output folder {path} is not writable ({existing} {what}); fix: choose another "
                         f"output folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {path} is not writable ({existing} is read-only); fix: choose a "
                         f"writable folder or fix its permissions")
    return path


def _hidden_sibling(path: Path, tag: str) -> Path:
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically (temporary sibling, fsync, rename)."""
    path = Path(path)
    ensure_writable_dir(path.parent)
    tmp = _hidden_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Strict JSON (no NaN), indented, atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2, allow_nan=False) + "\n").encode())


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One row per mapping, columns in the first row's key order, atomically."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_bytes(path, buf.getvalue().encode())


def write_figure(path: str | os.PathLike, fig: Any, dpi: int = 120) -> Path:
    """A matplotlib figure as a PNG (tight bounding box), atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return write_bytes(path, buf.getvalue())


def markdown_table(rows: Sequence[Mapping[str, Any]], floatfmt: str = ".3f") -> str:
    """A GitHub markdown table of ``rows`` (columns from the first row; floats with ``floatfmt``)."""
    cols = list(rows[0])

    def cell(v: Any) -> str:
        return format(v, floatfmt) if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a hidden empty sibling folder of ``target``; on success it replaces ``target`` (a new
    name; an existing ``target`` is renamed aside and deleted), on any exception it is deleted."""
    target = Path(target)
    ensure_writable_dir(target.parent)
    staging = _hidden_sibling(target, "partial")
    staging.mkdir()
    try:
        yield staging
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        old = _hidden_sibling(target, "old") if target.exists() else None
        if old is not None:
            os.rename(target, old)
        os.rename(staging, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
