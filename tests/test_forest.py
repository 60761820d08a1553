"""The pixel forest: features, stratified sampling, fitting and prediction."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ssl_seg.forest import (
    ForestSettings,
    fit_forest,
    fit_forest_on_slices,
    slice_features,
    stratified_sample,
)

SMALL = ForestSettings(trees=5, depth=6, samples_per_slice=2000)


def _disks(seed=0):
    from conftest import disks_volume

    image, labels = disks_volume(seed=seed)
    return ((image - image.min()) / np.ptp(image)).astype(np.float32), labels


def test_features_have_twenty_channels_per_pixel():
    plane = np.random.default_rng(0).random((24, 30)).astype(np.float32)
    f = slice_features(plane)
    assert f.shape == (24, 30, 20) and f.dtype == np.float32


def test_a_small_class_keeps_its_pixels_through_subsampling():
    labels = np.zeros(100_000, np.uint8)
    labels[:150] = 1  # 0.15 %: in proportion it would get 3 of 2000 pixels
    pick = stratified_sample(labels, 2000, np.random.default_rng(0))
    assert (labels[pick] == 1).sum() == 100
    assert len(pick) < 2200 and np.all(np.diff(pick) > 0)
    assert len(stratified_sample(labels[:500], 2000, np.random.default_rng(0))) == 500


def test_forest_fits_masked_pixels_and_predicts_probabilities():
    image, labels = _disks()
    forest = fit_forest_on_slices(image, labels, [2, 5], num_classes=3, settings=SMALL)
    probs = forest.predict_proba(image[6:8])
    assert probs.shape == (2, 3, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.all(probs[:, 2] == 0)  # a class it never saw
    pred = probs.argmax(1)
    inter = ((pred == 1) & (labels[6:8] == 1)).sum()
    assert 2 * inter / ((pred == 1).sum() + (labels[6:8] == 1).sum()) > 0.9


def test_unmasked_pixels_never_train_the_forest():
    image, labels = _disks()
    background = labels[2] == 0  # the disks' pixels are left out
    forest = fit_forest([image[2]], [labels[2]], [background], num_classes=2, settings=SMALL)
    assert list(forest.forest.classes_) == [0]
    assert forest.predict_proba(image[2:3])[:, 1].max() == 0


def test_bad_inputs():
    image, labels = _disks()
    with pytest.raises(ValueError, match=r"plane must be a 2D numeric array.*\(8, 32, 32\)"):
        slice_features(image)
    with pytest.raises(ValueError, match="0 < sigma_min <= sigma_max, got 4 and 2"):
        ForestSettings(sigma_min=4, sigma_max=2)
    with pytest.raises(ValueError, match="depth must be None or >= 1, got 0"):
        ForestSettings(depth=0)
    with pytest.raises(ValueError, match="no masked pixel"):
        fit_forest([image[2]], [labels[2]], [np.zeros((32, 32), bool)], num_classes=2)
    with pytest.raises(ValueError, match=r"labels must lie in 0..1 on masked pixels, got 0..2"):
        fit_forest([image[2]], [labels[2] * 2], [np.ones((32, 32), bool)], num_classes=2)
    with pytest.raises(ValueError, match=r"one shape, got \(32, 32\), \(32, 31\)"):
        fit_forest([image[2]], [labels[2][:, 1:]], [np.ones((32, 31), bool)], num_classes=2)


def test_a_large_slice_is_predicted_in_strips_as_a_whole():
    # Fully grown trees on random labels: thresholds everywhere, so a feature that a
    # strip got wrong (too little halo) changes some probability.
    rng = np.random.default_rng(1)
    planes = rng.random((3, 96, 40)).astype(np.float32)
    noise = rng.integers(0, 2, planes.shape).astype(np.uint8)
    deep = ForestSettings(trees=20, depth=None, sigma_max=4.0)
    forest = fit_forest_on_slices(planes, noise, [0, 1], num_classes=2, settings=deep)
    whole = forest.predict_proba(planes[2:])
    strips = forest.predict_proba(planes[2:], strip_pixels=10 * 40)  # 10 rows at a time
    np.testing.assert_allclose(strips, whole, atol=1e-6)
