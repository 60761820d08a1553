"""A real napari viewer opens our sample, reads our files and saves labels with our writer."""

import numpy as np
import pytest
import tifffile

from napari_ssl_seg import io

pytestmark = pytest.mark.gui

SHAPE = (60, 256, 256)
VOXEL = (0.29, 0.26, 0.26)


def test_open_sample(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-ssl-seg", "nuclei")
    image, annotations = viewer.layers["nuclei"], viewer.layers["annotations"]
    assert type(image).__name__ == "Image" and type(annotations).__name__ == "Labels"
    assert image.data.shape == annotations.data.shape == SHAPE
    np.testing.assert_allclose(image.scale, VOXEL)
    np.testing.assert_allclose(annotations.scale, VOXEL)
    assert annotations.data[30].any() and not annotations.data[10].any()


def test_open_tif_with_our_reader_and_save_labels(make_napari_viewer, tmp_path):
    image = np.random.default_rng(0).integers(0, 1000, (5, 20, 30)).astype(np.uint16)
    tifffile.imwrite(
        tmp_path / "cells.tif",
        image,
        imagej=True,
        resolution=(1 / 0.26, 1 / 0.26),
        metadata={"spacing": 0.29, "unit": "um", "axes": "ZYX"},
    )
    labels = (image > 500).astype(np.uint8)
    io.write_labels(tmp_path / "cells_labels.tif", labels, voxel_size=VOXEL)

    viewer = make_napari_viewer()
    (layer,) = viewer.open(tmp_path / "cells.tif", plugin="napari-ssl-seg")
    assert type(layer).__name__ == "Image" and layer.name == "cells"
    np.testing.assert_array_equal(np.asarray(layer.data), image)
    np.testing.assert_allclose(layer.scale, VOXEL)

    (label_layer,) = viewer.open(tmp_path / "cells_labels.tif", plugin="napari-ssl-seg")
    assert type(label_layer).__name__ == "Labels"
    np.testing.assert_array_equal(label_layer.data, labels)

    saved = label_layer.save(str(tmp_path / "out.nii.gz"), plugin="napari-ssl-seg")
    assert saved == [str(tmp_path / "out.nii.gz")]
    volume = io.read_volume(tmp_path / "out.nii.gz")
    np.testing.assert_array_equal(volume.data, labels)
    assert volume.voxel_size == pytest.approx(VOXEL)


def test_open_project(make_napari_viewer, tmp_path):
    store = pytest.importorskip("napari_ssl_seg.store")
    image = np.random.default_rng(0).random((4, 16, 16)).astype(np.float32)
    store.Project.create(tmp_path / "p.zarr", image, voxel_size=VOXEL)
    viewer = make_napari_viewer()
    layers = viewer.open(tmp_path / "p.zarr", plugin="napari-ssl-seg")
    assert [layer.name for layer in layers] == ["image", "annotations"]
    assert type(layers[1]).__name__ == "Labels" and layers[1].data.shape == image.shape
    assert layers[1].metadata["napari_ssl_seg_project"] == str(tmp_path / "p.zarr")
