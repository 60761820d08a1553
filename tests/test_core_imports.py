"""The core never imports Qt, napari or magicgui (checked in a fresh interpreter)."""

import subprocess
import sys

CORE = [
    "store",
    "labels",
    "io",
    "config",
    "data",
    "engine",
    "inference",
    "methods",
    "metrics",
    "cli",
    "jobs",
    "annotation",
    "demo",
    "models",
    "losses",
]


GUI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy")


def test_core_is_headless():
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}:\n"
        "    try:\n"
        "        importlib.import_module('napari_ssl_seg.' + m)\n"
        "    except ModuleNotFoundError as e:\n"
        "        if e.name != 'napari_ssl_seg.' + m: raise\n"
        "import napari_ssl_seg.methods as ms; [ms.get_method(n) for n in ms.method_names()]\n"
        f"gui = {GUI!r}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in gui]\n"
        "print(bad); sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_package_import_is_cheap():
    code = "import sys, napari_ssl_seg; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
