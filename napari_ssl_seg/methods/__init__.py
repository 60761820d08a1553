"""Registry of semi-supervised methods, looked up by name.

Each method lives in its own module and registers itself with :func:`register`.
"""

from __future__ import annotations

import difflib
import importlib

from napari_ssl_seg.methods.base import Batch, NetworkConfig, SSLMethod

__all__ = ["Batch", "NetworkConfig", "SSLMethod", "register", "get_method", "method_names"]

_REGISTRY: dict[str, type[SSLMethod]] = {}

# Modules that define the built-in methods; imported lazily so that importing the
# registry does not import every method's dependencies.
_BUILTIN_MODULES = (
    "supervised",
    "mean_teacher",
    "ua_mt",
    "cps",
    "dtc",
    "dtml",
    "simcvd",
    "diffusion",
)


def register(cls: type[SSLMethod]) -> type[SSLMethod]:
    """Class decorator that adds a method to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"napari_ssl_seg.methods.{module}")
        except ModuleNotFoundError as err:
            # A built-in module not written yet must not break the others.
            if err.name != f"napari_ssl_seg.methods.{module}":
                raise


def method_names() -> list[str]:
    """Names of every registered method, in registration order."""
    _load_builtins()
    return list(_REGISTRY)


def get_method(name: str) -> type[SSLMethod]:
    """Return the method class registered as ``name``.

    Raises
    ------
    ValueError
        If no method has that name; the message suggests the closest names.
    """
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"unknown method {name!r}; available: {sorted(_REGISTRY)}.{hint}")
    return _REGISTRY[name]
