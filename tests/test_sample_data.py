"""Tests of the bundled nuclei sample and its helpers."""

import numpy as np
import pytest

from napari_ssl_seg import _sample_data as sd
from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.io import read_volume

SHAPE = (60, 256, 256)


@pytest.fixture(scope="module")
def nuclei():
    return sd.load_nuclei()


def test_files_ship_inside_the_package():
    assert sd.SAMPLE_DIR.parent.name == "napari_ssl_seg"
    for path in (sd.NUCLEI_IMAGE, sd.NUCLEI_LABELS, sd.NUCLEI_ANNOTATIONS):
        assert path.is_file(), path


def test_load_nuclei(nuclei):
    image, truth, voxel_size = nuclei
    assert image.shape == truth.shape == SHAPE
    assert image.dtype == np.uint16 and truth.dtype == np.uint8
    assert set(np.unique(truth)) == {0, 1}
    assert voxel_size == (0.29, 0.26, 0.26)


def test_quickstart_slices():
    assert sd.quickstart_slices(3) == [10, 30, 50]
    assert sd.quickstart_slices(1) == [30]
    assert sd.quickstart_slices(4, depth=8) == [1, 3, 5, 7]
    assert sd.quickstart_slices(60) == list(range(60))  # distinct, in range
    assert sd.quickstart_slices(7) == [4, 12, 21, 30, 38, 47, 55]


def test_sparse_annotations(nuclei):
    _, truth, _ = nuclei
    annotations = sd.sparse_annotations(truth, [10, 30, 50])
    assert annotations.dtype == np.uint8 and annotations.shape == SHAPE
    np.testing.assert_array_equal(annotations[[10, 30, 50]], truth[[10, 30, 50]])
    others = np.setdiff1d(np.arange(60), [10, 30, 50])
    assert not annotations[others].any()
    assert not annotations[10].any()  # slice 10 is annotated background
    assert annotations[30].any() and annotations[50].any()


def test_committed_quickstart_file_matches_the_helpers(nuclei):
    _, truth, voxel_size = nuclei
    volume = read_volume(sd.NUCLEI_ANNOTATIONS)
    assert volume.data.dtype == np.uint8
    assert volume.voxel_size == pytest.approx(voxel_size)
    expected = sd.sparse_annotations(truth, sd.quickstart_slices(3))
    np.testing.assert_array_equal(volume.data, expected)
    assert sd.NUCLEI_ANNOTATIONS.stat().st_size < 100_000  # compressed


def test_noisy_nuclei_is_seeded_and_harder(nuclei):
    image, truth, _ = nuclei
    noisy = sd.noisy_nuclei(seed=0)
    assert noisy.dtype == np.uint16 and noisy.shape == SHAPE
    np.testing.assert_array_equal(noisy[20:22], sd.noisy_nuclei(seed=0)[20:22])
    assert not np.array_equal(noisy[20:22], sd.noisy_nuclei(seed=1)[20:22])

    def separation(volume):  # distance between nucleus and background, in noise units
        fg, bg = volume[truth == 1].astype(float), volume[truth == 0].astype(float)
        return (fg.mean() - bg.mean()) / np.sqrt((fg.var() + bg.var()) / 2)

    assert separation(noisy) < 0.6 * separation(image)


def test_napari_samples():
    layers = sd.nuclei_sample()
    assert [layer[2] for layer in layers] == ["image", "labels"]
    (image, image_kwargs, _), (annotations, labels_kwargs, _) = layers
    assert image.shape == annotations.shape == SHAPE
    assert image_kwargs == {"name": "nuclei", "scale": (0.29, 0.26, 0.26)}
    assert labels_kwargs == {
        "name": "annotations",
        "scale": (0.29, 0.26, 0.26),
        "metadata": {sd.ANNOTATED_SLICES_KEY: [10, 30, 50]},
    }
    assert annotations.dtype == np.uint8 and set(np.unique(annotations)) == {0, 1}


def test_bad_inputs(nuclei):
    _, truth, _ = nuclei
    with pytest.raises(InvalidInputError, match=r"n must be an integer in 1\.\.60, got 0"):
        sd.quickstart_slices(0)
    with pytest.raises(InvalidInputError, match=r"n must be an integer in 1\.\.60, got 2\.5"):
        sd.quickstart_slices(2.5)
    with pytest.raises(InvalidInputError, match=r"slices must be in 0\.\.59, got \[60\]"):
        sd.sparse_annotations(truth, [10, 60])
    with pytest.raises(InvalidInputError, match=r"3D integer array, got shape \(256, 256\)"):
        sd.sparse_annotations(truth[0], [0])
    with pytest.raises(InvalidInputError, match=r"3D integer array.*dtype float32"):
        sd.sparse_annotations(truth.astype(np.float32), [0])
    with pytest.raises(InvalidInputError, match=r"labels in 0\.\.255, got 0\.\.300"):
        sd.sparse_annotations(truth.astype(np.int32) * 300, [0])
    with pytest.raises(InvalidInputError, match=r"photons must be a positive number, got 0"):
        sd.noisy_nuclei(photons=0)
    with pytest.raises(InvalidInputError, match=r"read_noise must be a number >= 0, got -1"):
        sd.noisy_nuclei(read_noise=-1)
