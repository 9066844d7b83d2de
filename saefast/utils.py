"""Small helpers shared across saefast, one home each.

* :func:`output_folder`: write a folder of results under a temporary name and move it into place
  at the end, replacing an earlier one only when saefast wrote it and the caller allows it.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator, List, Union

__all__ = ["OUTPUT_MARKER", "output_folder"]

PathLike = Union[str, os.PathLike]

# Written into every folder made by output_folder: what wrote it and the files it holds, so that
# a later overwrite can tell saefast's own output from anything a user put there.
OUTPUT_MARKER = ".saefast-output.json"


def _relative_files(folder: Path) -> List[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if not p.is_dir())


def _check_replaceable(out: Path, kind: str, overwrite: bool, argument: str) -> None:
    """Raise ValueError unless ``out`` is absent, an empty folder, or (with ``overwrite``) a
    folder that saefast wrote as ``kind`` and that holds nothing else."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise ValueError(f"{argument} {out} is a file, not a folder; saefast writes the {kind} into a folder and "
                         f"never replaces a file: choose another {argument}")
    present = _relative_files(out)
    if not present and not any(out.iterdir()):
        return
    if not overwrite:
        raise ValueError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace "
                         f"a {kind} saefast wrote there, or choose another {argument}")
    marker = out / OUTPUT_MARKER
    try:
        record = json.loads(marker.read_text())
        written, written_kind = set(record["files"]), record["kind"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = ", ".join(present[:5]) + (", ..." if len(present) > 5 else "")
        raise ValueError(f"{out} holds files saefast did not write ({listed}); overwrite only replaces a folder "
                         f"written by saefast, so nothing was deleted: choose another {argument} or move those "
                         "files away") from None
    if written_kind != kind:
        raise ValueError(f"{out} holds a saefast {written_kind}, not a {kind}; nothing was deleted: choose another "
                         f"{argument}")
    foreign = [name for name in present if name not in written and name != OUTPUT_MARKER]
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise ValueError(f"{out} holds files saefast did not write there ({listed}); nothing was deleted: move them "
                         f"away or choose another {argument}")


@contextlib.contextmanager
def output_folder(out: PathLike, kind: str, overwrite: bool = False, argument: str = "out") -> Iterator[Path]:
    """Context manager yielding a fresh temporary folder beside ``out`` to write ``kind`` into.

    On a clean exit the files are recorded in :data:`OUTPUT_MARKER` and the folder is renamed
    to ``out``; on an error it is removed and ``out`` is untouched. ``out`` may already exist only
    as an empty folder or, with ``overwrite``, as a folder this function wrote for the same
    ``kind`` holding only the files it recorded: a regular file, a foreign folder or a folder
    with files added since is refused with a ValueError naming ``argument``, before any work.
    """
    out = Path(out)
    _check_replaceable(out, kind, overwrite, argument)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / OUTPUT_MARKER).write_text(json.dumps({"kind": kind, "files": _relative_files(tmp)}, indent=1))
        if out.exists():
            _check_replaceable(out, kind, True, argument)  # nothing foreign appeared meanwhile
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            tmp.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
