"""C++ kernels for the torch backend's hot loops on the CPU, compiled on first use and cached.

``saefast/csrc/cpu_kernels.cpp`` is built with ``torch.utils.cpp_extension.load`` (ninja) the
first time a CPU op asks for it, into torch's extensions cache (``TORCH_EXTENSIONS_DIR``, by
default ``~/.cache/torch_extensions``), so later processes load it in a fraction of a second. The
build's name carries a hash of the source, the compiler flags and the CPU's instruction set, so
different saefast versions (or machines) sharing one cache each keep their own build instead of
rebuilding over one another.
Its kernels use torch's thread pool (``torch.set_num_threads``).

:func:`kernels` returns the loaded ops (``torch.ops.saefast_cpu``) or None, in which case the
torch backend runs its pure-PyTorch path, which computes the same results. None when:

* ``SAEFAST_CPU_KERNELS=0`` (``off``/``false``) is set: the pure-PyTorch path, always;
* no C++ compiler or ninja is found, or the build fails: a warning is logged once.

The kernels' contracts (shapes, dtypes, exactness, tie rule) are in the C++ file's header and in
the torch backend functions that call them; tests compare both paths on random inputs.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import threading
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

__all__ = ["kernels", "enabled", "available", "SOURCE"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "cpu_kernels.cpp"
ENV = "SAEFAST_CPU_KERNELS"
_lock = threading.Lock()
_state = {"tried": False, "ops": None}


def enabled() -> bool:
    """Whether the environment allows the C++ kernels (``SAEFAST_CPU_KERNELS`` is not 0/off/false)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "off", "false", "no")


def _build_tag(cflags: list) -> str:
    """A short hash of the source, the compiler flags and the CPU's instruction-set flags: the
    build targets this CPU (``-march=native``), so a cache shared by different machines or
    different saefast versions keeps one build per kind."""
    flags = platform.machine() + " ".join(cflags) + hashlib.sha1(SOURCE.read_bytes()).hexdigest()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags += line
                    break
    except OSError:
        pass
    return hashlib.sha1(flags.encode()).hexdigest()[:8]


def _compiler_found() -> bool:
    cxx = os.environ.get("CXX", "c++")
    return shutil.which(cxx.split()[0]) is not None


def _build() -> Optional[ModuleType]:
    from torch.utils import cpp_extension

    if not _compiler_found():
        logger.warning("saefast: no C++ compiler found; CPU ops use the pure-PyTorch path (slower). Install "
                       "g++ (or set CXX) to build the CPU kernels")
        return None
    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        logger.warning("saefast: ninja not found; CPU ops use the pure-PyTorch path (slower). "
                       "`pip install ninja` to build the CPU kernels")
        return None
    # -fopenmp: at::parallel_for is inline OpenMP code; the library it links (libgomp.so.1) is the
    # one torch has already loaded, so both share one thread pool.
    flags = ["-O3", "-std=c++17", "-fopenmp"] + (["-march=native"] if platform.machine() in ("x86_64", "AMD64")
                                                  else [])
    name = f"saefast_cpu_{_build_tag(flags)}"
    try:
        cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                           is_python_module=False, verbose=False)
    except Exception as err:  # noqa: BLE001 - any build failure means: use the fallback
        logger.warning("saefast: building the CPU kernels failed (%s: %s); CPU ops use the pure-PyTorch path",
                       type(err).__name__, str(err).strip().splitlines()[-1] if str(err).strip() else "")
        return None
    return torch.ops.saefast_cpu


def kernels() -> Optional[ModuleType]:
    """``torch.ops.saefast_cpu`` (built on first call), or None (see the module docstring)."""
    if not enabled():
        return None
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                logger.info("saefast: loading the CPU kernels (the first build takes about a minute)")
                _state["ops"] = _build()
                _state["tried"] = True
    return _state["ops"]


def available() -> bool:
    """Whether the C++ kernels are in use for CPU tensors."""
    return kernels() is not None
