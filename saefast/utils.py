"""Small helpers shared across saefast, one home each.

* Files: :func:`output_folder` (a folder of results written under a temporary name and moved
  into place, replacing an earlier one only when saefast wrote it and the caller allows it),
  :func:`write_atomic` (one file, via a temporary sibling), :func:`fsync_path`,
  :func:`read_json` / :func:`write_json`.
* Faults: :func:`load_safetensors` / :func:`load_torch` (a truncated or damaged file is a
  :class:`CorruptFileError` naming it), :func:`reporting_disk_full` and :func:`save_torch` (a
  full disk while writing is a :class:`DiskFullError` naming the file), :func:`is_temporary_name`
  (what the writers above leave behind when killed).
* Modules: :func:`eval_mode` (eval() for a block, the previous mode restored after).
* Results: :class:`LazyDict` (a dict with entries computed only when read, e.g. dense features).
* SAE weights: :func:`fill_weights` (copy named tensors into an SAE with shape and finiteness
  checks), :func:`load_torch_weights` (a ``.pt`` state dict, weights only: never unpickles
  arbitrary objects), :func:`without_rng` (build without consuming the global RNG).
* Hook names: :func:`parse_hook` (``"blocks.8.hook_resid_pre"`` -> layer 8, name ``"hook_resid_pre"``).
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar, Union

import torch
from torch import Tensor, nn

__all__ = ["OUTPUT_MARKER", "output_folder", "write_atomic", "fsync_path", "read_json", "write_json", "eval_mode",
           "fill_weights", "check_finite", "without_rng", "parse_hook", "CorruptFileError", "load_safetensors",
           "load_torch", "load_torch_weights", "save_torch", "DiskFullError", "is_disk_full", "reporting_disk_full",
           "is_temporary_name", "LazyDict"]

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


def fsync_path(path: Union[str, os.PathLike]) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: PathLike, write: Callable[[Path], None], fsync: bool = False) -> Path:
    """Write one file through ``write(tmp_path)`` into a temporary sibling, then rename it over
    ``path``: readers see the old file or the new one, never half of it. A full disk raises a
    :class:`DiskFullError` naming ``path``, and the temporary file is removed."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with reporting_disk_full(path):
            write(tmp)
            if fsync:
                fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def is_temporary_name(name: str) -> bool:
    """Whether ``name`` is a temporary file or folder of :func:`write_atomic`, :func:`output_folder`
    or an SAE save (``.<target>.tmp-<id>``, ``.<target>.old-<id>``): half-written when a process
    was killed, safe to remove when no saefast process is writing there."""
    return name.startswith(".") and (".tmp-" in name or ".old-" in name)


# ----------------------------------------------------------------------------------------------
# Faults: damaged files, full disks
# ----------------------------------------------------------------------------------------------

class CorruptFileError(ValueError):
    """A file that exists but cannot be read (truncated, damaged, or not in its format)."""

    def __init__(self, path: PathLike, reason: str, fix: str = "") -> None:
        self.path = Path(path)
        super().__init__(f"{path} is truncated or damaged and cannot be read ({reason})" + (f"; {fix}" if fix else ""))


_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError, ValueError, KeyError)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def load_safetensors(path: PathLike, fix: str = "", device: str = "cpu") -> Dict[str, Tensor]:
    """``safetensors.torch.load_file(path)``; a truncated or damaged file raises a
    :class:`CorruptFileError` naming it and saying ``fix`` (a missing one, FileNotFoundError)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "file not found", str(path))
    try:
        return load_file(str(path), device=device)
    except PermissionError:
        raise
    except (SafetensorError, *_UNREADABLE) as err:
        raise CorruptFileError(path, _reason(err), fix) from err


def load_torch(path: PathLike, fix: str = "") -> Any:
    """``torch.load(path, weights_only=True, map_location="cpu")``; a truncated or damaged file
    raises a :class:`CorruptFileError` naming it and saying ``fix`` (a missing one,
    FileNotFoundError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(errno.ENOENT, "file not found", str(path))
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except PermissionError:
        raise
    except _UNREADABLE as err:
        raise CorruptFileError(path, _reason(err), fix) from err


class DiskFullError(OSError):
    """No space left on the device (or quota exceeded) while writing ``filename``."""

    def __init__(self, path: PathLike, note: str = "") -> None:
        message = f"no space left on device while writing {path}" + (f"; {note}" if note else "")
        super().__init__(errno.ENOSPC, message, str(path))

    def __str__(self) -> str:
        return self.strerror

    def with_note(self, note: str) -> "DiskFullError":
        """The same error with ``note`` appended (e.g. where the last good checkpoint is)."""
        return DiskFullError(self.filename, note)


_DISK_FULL_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (from Python, torch or safetensors) means the disk or quota is full."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return any(text in str(err) for text in _DISK_FULL_TEXTS)


@contextlib.contextmanager
def reporting_disk_full(path: PathLike) -> Iterator[None]:
    """Turn a full disk inside the block into a :class:`DiskFullError` naming ``path``; other
    errors pass unchanged. (``torch.save`` reports a full disk as an unrelated RuntimeError: write
    with :func:`save_torch`.)"""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise DiskFullError(path) from err
        raise


class _RecordingWriter:
    """A file object for torch.save that keeps the OSError of a failed write: torch replaces it by
    a RuntimeError about stream positions."""

    def __init__(self, file: Any) -> None:
        self.file, self.error = file, None

    def write(self, data: Any) -> int:
        try:
            return self.file.write(data)
        except OSError as err:
            self.error = err
            raise

    def flush(self) -> None:
        self.file.flush()


def save_torch(obj: Any, path: PathLike, named: Optional[PathLike] = None) -> None:
    """``torch.save(obj, path)``; a full disk raises a :class:`DiskFullError` naming ``named``
    (default ``path``: a temporary file may name its destination)."""
    with reporting_disk_full(named if named is not None else path), open(path, "wb") as f:
        writer = _RecordingWriter(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as err:
            if writer.error is not None:
                raise writer.error from err
            raise


def _jsonable(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return value.tolist()
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def write_json(data: Any, path: PathLike) -> None:
    """``data`` as indented JSON (tensors, numpy values, dtypes and paths converted)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, default=_jsonable)
        f.write("\n")


def read_json(path: PathLike) -> Dict[str, Any]:
    """The JSON object in ``path``; a ValueError naming the file when it is not valid JSON or not
    an object."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` inside the block; its previous train/eval mode afterwards."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


class LazyDict(dict):
    """A dict whose ``lazy`` entries (name -> zero-argument function) are computed on first read
    (``d[name]`` or ``d.get(name)``) and stored from then on.

    ``name in d`` is True for a lazy entry before it is computed; iteration, ``len``, ``keys()``
    and ``items()`` show only the entries computed so far, so logging or copying the dict never
    triggers the computation.
    """

    def __init__(self, values: Any = (), lazy: Optional[Mapping[str, Callable[[], Any]]] = None) -> None:
        super().__init__(values)
        self._lazy: Dict[str, Callable[[], Any]] = dict(lazy or {})

    def __missing__(self, key: Any) -> Any:
        make = self._lazy.get(key) if isinstance(key, str) else None
        if make is None:
            raise KeyError(key)
        value = make()
        self[key] = value
        return value

    def __contains__(self, key: Any) -> bool:
        return dict.__contains__(self, key) or (isinstance(key, str) and key in self._lazy)

    def get(self, key: Any, default: Any = None) -> Any:
        return self[key] if key in self else default


def check_finite(where: str, name: str, tensor: Tensor) -> None:
    """Raise a ValueError naming ``where`` and ``name`` when a float tensor holds NaN or inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{where}: {name} holds {bad} NaN or inf value(s); the weights are damaged (or were saved "
                         "from a diverged run): load an earlier checkpoint or re-train")


def fill_weights(module: nn.Module, weights: Mapping[str, Tensor], expected: Mapping[str, Tuple[int, ...]],
                 where: str, hint: str) -> None:
    """Copy ``weights[name]`` into ``module.<name>`` for every name of ``expected`` (its shape),
    converting device and dtype; a missing, misshapen or non-finite tensor raises a ValueError
    naming ``where`` (the file) and the tensor. ``hint`` says where the shapes come from."""
    missing = [name for name in expected if name not in weights]
    if missing:
        raise ValueError(f"{where}: the weights lack {missing}; a {type(module).__name__} needs {list(expected)}")
    with torch.no_grad():
        for name, shape in expected.items():
            tensor = weights[name]
            if tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"{where}: {name} has shape {tuple(tensor.shape)} but the config says {hint}, "
                                 f"so it must be {list(shape)}")
            check_finite(where, name, tensor)
            target = getattr(module, name)
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def load_torch_weights(file: PathLike, fix: str = "") -> Dict[str, Tensor]:
    """A state dict from a ``.pt`` file through :func:`load_torch` (``weights_only=True``: tensors
    and plain containers only). A file pickling other objects is refused with a ValueError naming
    it; a truncated or damaged one raises :class:`CorruptFileError`."""
    try:
        state = load_torch(file, fix)
    except CorruptFileError as err:
        if isinstance(err.__cause__, pickle.UnpicklingError):
            raise ValueError(f"{file} cannot be read as a weights-only state dict ({_reason(err.__cause__)}); "
                             "saefast never unpickles arbitrary objects: save the state dict "
                             "(model.state_dict()) instead") from None
        raise
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file} must hold a state dict (a dict of tensors), got {type(state).__name__}")
    return state


T = TypeVar("T")


def without_rng(build: Callable[[], T]) -> T:
    """``build()`` without consuming the global RNG (for objects whose random initial weights are
    about to be overwritten)."""
    with torch.random.fork_rng(devices=[]):
        return build()


_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def parse_hook(hook: str) -> Tuple[Optional[int], str]:
    """``"blocks.8.hook_resid_pre"`` -> ``(8, "hook_resid_pre")``; a hook outside the blocks
    (``"hook_embed"``, ``"ln_final.hook_normalized"``) -> ``(None, hook)``."""
    match = _HOOK_RE.match(hook)
    if match:
        return int(match.group(1)), match.group(2)
    return None, hook
