"""Tests of the napari reader contribution, without a viewer."""

import numpy as np
import pytest
import tifffile
import zarr

from napari_ssl_seg import _reader, io
from napari_ssl_seg.errors import InvalidInputError

VOXEL = (0.29, 0.26, 0.26)


@pytest.fixture
def image():
    return np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)


def test_get_reader_claims_supported_paths_only(tmp_path):
    for name in ["a.tif", "a.TIFF", "a.nii", "a.nii.gz", "a.zarr"]:
        assert _reader.get_reader(str(tmp_path / name)) is not None, name
    assert _reader.get_reader(str(tmp_path / "a.png")) is None
    assert _reader.get_reader([str(tmp_path / "a.tif"), str(tmp_path / "b.tif")]) is None
    (tmp_path / "folder").mkdir()
    assert _reader.get_reader(str(tmp_path / "folder")) is None  # neither zarr nor project
    zarr.save_array(tmp_path / "plain", np.zeros((2, 3, 4)))
    assert _reader.get_reader(str(tmp_path / "plain")) is not None


def test_image_tif_becomes_a_scaled_image_layer(tmp_path, image):
    tifffile.imwrite(
        tmp_path / "cells.tif",
        image,
        imagej=True,
        resolution=(1 / 0.26, 1 / 0.26),
        metadata={"spacing": 0.29, "unit": "um", "axes": "ZYX"},
    )
    reader = _reader.get_reader(str(tmp_path / "cells.tif"))
    ((data, kwargs, layer_type),) = reader(str(tmp_path / "cells.tif"))
    assert layer_type == "image" and kwargs["name"] == "cells"
    assert kwargs["scale"] == pytest.approx(VOXEL)
    np.testing.assert_array_equal(np.asarray(data), image)


def test_integer_file_named_label_becomes_labels(tmp_path):
    labels = np.zeros((4, 16, 16), np.uint8)
    labels[1, 2:5, 3:7] = 2
    io.write_labels(tmp_path / "nuclei_labels.nii.gz", labels, voxel_size=VOXEL)
    path = str(tmp_path / "nuclei_labels.nii.gz")
    ((data, kwargs, layer_type),) = _reader.get_reader(path)(path)
    assert layer_type == "labels" and kwargs["name"] == "nuclei_labels"
    assert isinstance(data, np.ndarray)  # in memory, so napari can paint it
    np.testing.assert_array_equal(data, labels)
    assert kwargs["metadata"][_reader.AFFINE_KEY].shape == (4, 4)
    # the same integer data under another name is an image
    io.write_labels(tmp_path / "mask.tif", labels)
    ((_, _, layer_type),) = _reader.get_reader(str(tmp_path / "mask.tif"))(
        str(tmp_path / "mask.tif")
    )
    assert layer_type == "image"


def test_reader_errors_name_the_file(tmp_path):
    tifffile.imwrite(tmp_path / "flat.tif", np.zeros((8, 9), np.uint8))
    reader = _reader.get_reader(str(tmp_path / "flat.tif"))
    with pytest.raises(InvalidInputError, match=r"flat\.tif.*shape \(8, 9\)"):
        reader(str(tmp_path / "flat.tif"))


def test_project_without_rounds(tmp_path, image):
    store = pytest.importorskip("napari_ssl_seg.store")
    path = tmp_path / "proj.zarr"
    store.Project.create(path, image, voxel_size=VOXEL)
    assert _reader.is_project(path)
    reader = _reader.get_reader(str(path))
    layers = reader(str(path))
    assert [(kw["name"], kind) for _, kw, kind in layers] == [
        ("image", "image"),
        ("annotations", "labels"),
    ]
    for data, kwargs, _ in layers:
        assert data.shape == image.shape
        assert kwargs["scale"] == VOXEL
        assert kwargs["metadata"] == {"napari_ssl_seg_project": str(path)}
    np.testing.assert_array_equal(layers[0][0][...], image)


class _FakeProject:
    """The documented part of store.Project, with one committed round."""

    image = zarr.zeros((3, 4, 5), dtype=np.float32)
    annotations = zarr.zeros((3, 4, 5), dtype=np.uint8)
    voxel_size = None
    latest_round = 2

    @classmethod
    def open(cls, path):
        return cls()

    def merged_labels(self):
        return np.ones((3, 4, 5), np.uint16)

    def confidence(self, r):
        assert r == 2
        return zarr.full((3, 4, 5), 0.5, dtype=np.float32)


def test_project_with_a_round(tmp_path, monkeypatch):
    store = pytest.importorskip("napari_ssl_seg.store")
    monkeypatch.setattr(store, "Project", _FakeProject)
    layers = _reader.read_project_layers(tmp_path / "p.zarr")
    names = [(kw["name"], kind) for _, kw, kind in layers]
    assert names == [
        ("image", "image"),
        ("confidence · round 2", "image"),
        ("pseudo-labels · round 2", "labels"),
        ("annotations", "labels"),
    ]
    confidence = layers[1][1]
    assert confidence["colormap"] == "magma" and confidence["contrast_limits"] == (0.0, 1.0)
    assert all("scale" not in kw for _, kw, _ in layers)  # no voxel size known
    assert all(kw["metadata"]["napari_ssl_seg_project"] for _, kw, _ in layers)
    np.testing.assert_array_equal(layers[2][0], 1)
