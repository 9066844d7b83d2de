"""Lazy exports for packages whose submodules import heavy or optional libraries
(transformer-lens, datasets, matplotlib): the names resolve on first attribute access."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


def lazy_getattr(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<exports[name]>`` and returns its ``name``."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f"{package}.{module}"), name)

    return __getattr__
