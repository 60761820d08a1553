"""Tests of napari_ssl_seg.io: round trips, lazy opening, bad inputs, atomic writes."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import zarr

from napari_ssl_seg import io
from napari_ssl_seg.errors import InvalidInputError, ProjectError, UnsupportedFileError

VOXEL = (0.29, 0.26, 0.26)


@pytest.fixture
def labels():
    rng = np.random.default_rng(0)
    return rng.integers(0, 4, size=(5, 6, 7)).astype(np.uint8)


@pytest.mark.parametrize("name", ["a.tif", "a.tiff", "a.nii", "a.nii.gz", "a.zarr", "a.ome.zarr"])
def test_round_trip_keeps_data_and_voxel_size(tmp_path, labels, name):
    written = io.write_labels(tmp_path / name, labels, voxel_size=VOXEL)
    assert written == tmp_path / name
    volume = io.read_volume(written)
    assert isinstance(volume.data, np.ndarray)
    assert volume.data.dtype == np.uint8
    np.testing.assert_array_equal(volume.data, labels)
    assert volume.voxel_size == pytest.approx(VOXEL)
    assert volume.axes == "zyx"
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left


def test_nifti_keeps_affine_and_stores_xyz(tmp_path, labels):
    affine = np.array([[0, 0, -0.5, 10], [0, 0.4, 0, -3], [0.3, 0, 0, 7], [0, 0, 0, 1.0]])
    path = io.write_labels(tmp_path / "a.nii.gz", labels, affine=affine)
    volume = io.read_volume(path)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(volume.data, labels)
    # voxel size (z, y, x) comes from the zooms of file axes (x, y, z)
    assert volume.voxel_size == pytest.approx((0.5, 0.4, 0.3))
    import nibabel

    assert nibabel.load(path).shape == labels.shape[::-1]


def test_nifti_affine_built_from_voxel_size(tmp_path, labels):
    volume = io.read_volume(io.write_labels(tmp_path / "a.nii", labels, voxel_size=VOXEL))
    np.testing.assert_allclose(np.diag(volume.affine), [0.26, 0.26, 0.29, 1], rtol=1e-6)


def test_nifti_lazy_view_indexes_like_numpy(tmp_path, labels):
    path = io.write_labels(tmp_path / "a.nii.gz", labels)
    data = io.open_volume(path).data
    assert data.shape == labels.shape and data.dtype == np.uint8
    for key in [(2,), (slice(1, 4), 3), (..., 5), (1, slice(None), slice(2, 6, 2)), np.s_[::-1]]:
        np.testing.assert_array_equal(data[key], labels[key])
    np.testing.assert_array_equal(data[[0, 2]], labels[[0, 2]])  # fancy: read, then index
    np.testing.assert_array_equal(np.asarray(data), labels)


def test_large_labels_keep_their_values(tmp_path, labels):
    big = labels.astype(np.int64) * 70_000
    for name in ["big.tif", "big.nii.gz", "big.zarr"]:
        volume = io.read_volume(io.write_labels(tmp_path / name, big, voxel_size=VOXEL))
        assert volume.data.dtype == np.uint32
        np.testing.assert_array_equal(volume.data, big)
        assert volume.voxel_size == pytest.approx(VOXEL)


def test_bool_labels_and_missing_voxel_size(tmp_path, labels):
    volume = io.read_volume(io.write_labels(tmp_path / "a.tif", labels > 1))
    assert volume.data.dtype == np.uint8 and volume.voxel_size is None
    np.testing.assert_array_equal(volume.data, labels > 1)


def test_written_tif_is_an_imagej_hyperstack(tmp_path, labels):
    path = io.write_labels(tmp_path / "a.tif", labels, voxel_size=VOXEL)
    with tifffile.TiffFile(path) as tif:
        assert tif.is_imagej
        assert tif.imagej_metadata["spacing"] == pytest.approx(0.29)
        assert tif.imagej_metadata["unit"] == "micron"
        assert tif.series[0].axes == "ZYX"


def test_written_zarr_is_ome_ngff_05_with_labels(tmp_path, labels):
    path = io.write_labels(tmp_path / "seg.ome.zarr", labels, voxel_size=VOXEL)
    root = json.loads((path / "zarr.json").read_text())
    assert root["zarr_format"] == 3 and root["node_type"] == "group"
    ome = root["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert [a["name"] for a in multiscale["axes"]] == ["z", "y", "x"]
    assert {a["type"] for a in multiscale["axes"]} == {"space"}
    assert {a["unit"] for a in multiscale["axes"]} == {"micrometer"}
    (level,) = multiscale["datasets"]
    assert level["path"] == "0"
    assert level["coordinateTransformations"] == [{"type": "scale", "scale": list(VOXEL)}]
    array = json.loads((path / "0" / "zarr.json").read_text())
    assert array["dimension_names"] == ["z", "y", "x"]
    assert json.loads((path / "labels" / "zarr.json").read_text())["attributes"]["ome"] == {
        "version": "0.5",
        "labels": ["seg"],
    }
    label_ome = json.loads((path / "labels" / "seg" / "zarr.json").read_text())["attributes"]
    image_label = label_ome["ome"]["image-label"]
    assert image_label["source"] == {"image": "../../"}
    assert [c["label-value"] for c in image_label["colors"]] == [0, 1, 2, 3]
    assert image_label["colors"][0]["rgba"] == [0, 0, 0, 0]
    np.testing.assert_array_equal(zarr.open_array(path / "labels" / "seg" / "0")[...], labels)


def test_zarr_overwrite_replaces_the_store(tmp_path, labels):
    path = tmp_path / "a.zarr"
    io.write_labels(path, labels, name="first")
    io.write_labels(path, labels + 1, name="second", overwrite=True)
    np.testing.assert_array_equal(io.read_volume(path).data, labels + 1)
    assert not (path / "labels" / "first").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr"]


def test_open_plain_zarr_array_and_ome_04(tmp_path, labels):
    zarr.save_array(tmp_path / "plain.zarr", labels)
    volume = io.open_volume(tmp_path / "plain.zarr")
    assert isinstance(volume.data, zarr.Array) and volume.voxel_size is None
    group = zarr.open_group(tmp_path / "v04.zarr", mode="w", zarr_format=2)
    group.create_array("s0", data=labels)
    axes = [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
    scale = [{"type": "scale", "scale": [2.0, 1.0, 1.0]}]
    group.attrs["multiscales"] = [
        {
            "version": "0.4",
            "axes": axes,
            "datasets": [{"path": "s0", "coordinateTransformations": scale}],
            "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5, 0.5]}],
        }
    ]
    volume = io.read_volume(tmp_path / "v04.zarr")
    assert volume.voxel_size == (2.0, 0.5, 0.5)
    np.testing.assert_array_equal(volume.data, labels)


def test_lazy_open_of_a_compressed_tif_reads_slices(tmp_path):
    image = np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32)
    tifffile.imwrite(tmp_path / "c.tif", image, compression="zlib", photometric="minisblack")
    with io.open_volume(tmp_path / "c.tif") as volume:
        assert not isinstance(volume.data, np.ndarray)
        assert volume.shape == (4, 32, 32) and volume.dtype == np.uint16
        np.testing.assert_array_equal(volume.data[2, 5:9], image[2, 5:9])


def test_lazy_open_of_an_uncompressed_tif_is_a_memory_map(tmp_path):
    image = np.arange(4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)
    tifffile.imwrite(tmp_path / "u.tif", image, photometric="minisblack")
    volume = io.open_volume(tmp_path / "u.tif")
    assert isinstance(volume.data, np.memmap)
    np.testing.assert_array_equal(volume.data[3], image[3])
    assert type(io.read_volume(tmp_path / "u.tif").data) is np.ndarray


def test_tif_voxel_size_from_ome_xml(tmp_path):
    image = np.zeros((3, 4, 5), dtype=np.uint16)
    tifffile.imwrite(
        tmp_path / "a.ome.tif",
        image,
        ome=True,
        metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeY": 0.5, "PhysicalSizeX": 0.4},
    )
    assert io.open_volume(tmp_path / "a.ome.tif").voxel_size == (2.0, 0.5, 0.4)


def test_detect_format():
    assert io.detect_format("x/a.TIF") == "tiff"
    assert io.detect_format("a.nii.gz") == "nifti"
    assert io.detect_format("a.ome.zarr") == "zarr"
    assert io.detect_format("a.png") is None


# --- bad inputs --------------------------------------------------------------------------


def test_bad_inputs_open(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.tif.*no such file"):
        io.open_volume(tmp_path / "missing.tif")

    (tmp_path / "empty.tif").write_bytes(b"")
    with pytest.raises(UnsupportedFileError, match=r"empty\.tif.*empty \(0 bytes\)"):
        io.open_volume(tmp_path / "empty.tif")

    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    with pytest.raises(UnsupportedFileError, match=r"image\.png.*unknown file type '\.png'"):
        io.open_volume(tmp_path / "image.png")

    (tmp_path / "corrupt.tif").write_bytes(b"this is not a tiff at all")
    with pytest.raises(UnsupportedFileError, match=r"corrupt\.tif.*as TIFF"):
        io.read_volume(tmp_path / "corrupt.tif")

    (tmp_path / "corrupt.nii.gz").write_bytes(b"not gzip either")
    with pytest.raises(UnsupportedFileError, match=r"corrupt\.nii\.gz.*as NIFTI"):
        io.open_volume(tmp_path / "corrupt.nii.gz")

    (tmp_path / "folder.tif").mkdir()
    with pytest.raises(UnsupportedFileError, match=r"folder\.tif.*is a directory"):
        io.open_volume(tmp_path / "folder.tif")

    (tmp_path / "none.zarr").mkdir()
    with pytest.raises(UnsupportedFileError, match=r"none\.zarr.*as ZARR"):
        io.open_volume(tmp_path / "none.zarr")


def test_bad_inputs_truncated_nifti(tmp_path, labels):
    path = io.write_labels(tmp_path / "a.nii.gz", np.tile(labels, (4, 4, 4)))
    (tmp_path / "cut.nii.gz").write_bytes(path.read_bytes()[:400])
    with pytest.raises(UnsupportedFileError, match=r"cut\.nii\.gz.*corrupt or truncated"):
        io.read_volume(tmp_path / "cut.nii.gz")


@pytest.mark.parametrize(
    "shape, pattern",
    [((8, 9), r"shape \(8, 9\) \(2D\)"), ((2, 3, 4, 5), r"shape \(2, 3, 4, 5\) \(4D\)")],
)
def test_bad_inputs_not_3d(tmp_path, shape, pattern):
    data = np.zeros(shape, dtype=np.uint8)
    tifffile.imwrite(tmp_path / "a.tif", data, photometric="minisblack")
    import nibabel

    nibabel.save(nibabel.Nifti1Image(data, np.eye(4), dtype=np.uint8), tmp_path / "a.nii.gz")
    zarr.save_array(tmp_path / "a.zarr", data)
    for name in ["a.tif", "a.nii.gz", "a.zarr"]:
        with pytest.raises(InvalidInputError, match=rf"a\.{name[2:]}.*{pattern}.*need a 3D"):
            io.open_volume(tmp_path / name)


def test_bad_inputs_rgb_tif_and_project_group(tmp_path):
    tifffile.imwrite(tmp_path / "rgb.tif", np.zeros((8, 9, 3), np.uint8), photometric="rgb")
    with pytest.raises(InvalidInputError, match=r"rgb\.tif.*colour samples"):
        io.open_volume(tmp_path / "rgb.tif")
    zarr.open_group(tmp_path / "p.zarr", mode="w", attributes={"napari_ssl_seg": {}})
    with pytest.raises(
        UnsupportedFileError, match=r"p\.zarr.*without OME-Zarr .multiscales.*project"
    ):
        io.open_volume(tmp_path / "p.zarr")


def test_bad_inputs_write(tmp_path, labels):
    with pytest.raises(InvalidInputError, match=r"integer dtype, got float32"):
        io.write_labels(tmp_path / "a.tif", labels.astype(np.float32))
    with pytest.raises(InvalidInputError, match=r">= 0, got a minimum of -1"):
        io.write_labels(tmp_path / "a.tif", labels.astype(np.int16) - 1)
    with pytest.raises(InvalidInputError, match=r"3D \(z, y, x\) array, got shape \(6, 7\)"):
        io.write_labels(tmp_path / "a.tif", labels[0])
    with pytest.raises(UnsupportedFileError, match=r"a\.png.*\.tif, \.tiff, \.nii"):
        io.write_labels(tmp_path / "a.png", labels)
    with pytest.raises(InvalidInputError, match=r"voxel_size must be 3 positive.*\(1, 0, 1\)"):
        io.write_labels(tmp_path / "a.tif", labels, voxel_size=(1, 0, 1))
    with pytest.raises(InvalidInputError, match=r"affine must be a finite \(4, 4\).*\(3, 3\)"):
        io.write_labels(tmp_path / "a.nii", labels, affine=np.eye(3))
    with pytest.raises(FileNotFoundError, match=r"folder .*nowhere.* does not exist"):
        io.write_labels(tmp_path / "nowhere" / "a.tif", labels)
    (tmp_path / "dir.zarr").mkdir()
    (tmp_path / "dir.zarr" / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"dir\.zarr.*not a Zarr store"):
        io.write_labels(tmp_path / "dir.zarr", labels, overwrite=True)
    zarr.open_group(tmp_path / "proj.zarr", mode="w", attributes={"napari_ssl_seg": {}})
    with pytest.raises(ProjectError, match=r"proj\.zarr.*napari-ssl-seg project"):
        io.write_labels(tmp_path / "proj.zarr", labels, overwrite=True)
    assert (tmp_path / "dir.zarr" / "notes.txt").read_text() == "precious"


WRITERS = {
    "a.tif": (io._formats, "write_tiff"),
    "a.nii.gz": (io._formats, "write_nifti"),
    "a.zarr": (io._ome_zarr, "write_label_image"),
}


@pytest.mark.parametrize("name", list(WRITERS))
def test_failed_write_leaves_nothing_half_written(tmp_path, labels, monkeypatch, name):
    path = tmp_path / name
    io.write_labels(path, labels)  # an older, good version
    before = sorted(p.name for p in tmp_path.iterdir())

    def fail_midway(tmp, *args, **kwargs):
        tmp.mkdir() if name.endswith(".zarr") else tmp.write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(*WRITERS[name], fail_midway)
    with pytest.raises(OSError, match="disk full"):
        io.write_labels(path, labels + 1, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    np.testing.assert_array_equal(io.read_volume(path).data, labels)

    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(OSError, match="disk full"):
        io.write_labels(path, labels)
    assert list(tmp_path.iterdir()) == []


def test_headless_imports():
    """io and the napari contribution modules load neither napari nor Qt."""
    code = (
        "import sys\n"
        "import napari_ssl_seg.io, napari_ssl_seg._reader, napari_ssl_seg._writer\n"
        "import napari_ssl_seg._sample_data\n"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'magicgui')"
        " if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("name", ["a.tif", "a.nii.gz", "a.zarr"])
def test_write_replaces_an_existing_path_only_when_asked(tmp_path, labels, name):
    from napari_ssl_seg.errors import PathExistsError

    path = io.write_labels(tmp_path / name, labels)
    with pytest.raises(PathExistsError, match=rf"{name} already exists; pass overwrite=True"):
        io.write_labels(path, labels + 1)
    np.testing.assert_array_equal(io.read_volume(path).data, labels)
    io.write_labels(path, labels + 1, overwrite=True)
    np.testing.assert_array_equal(io.read_volume(path).data, labels + 1)
