"""The training set reads slices on demand and equals the whole-volume computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ssl_seg.data import (
    TwoStreamSampler,
    confident_pseudo_labels,
    load_training_set,
    normalisation,
    normalise,
    pseudo_label_floors,
    smooth,
    smoothing_sigmas,
)
from napari_ssl_seg.engine import run_round
from napari_ssl_seg.store import Project
from tests.conftest import disks_volume


def whole_volume_arrays(project: Project, config, pseudo_round: int):
    """(image, target, weight) computed on whole in-memory arrays, slice axis first."""
    axis = project.axis
    norm = normalisation(project.image, axis)
    image = np.moveaxis(normalise(project.image[...], norm), axis, 0)
    image = smooth(image, smoothing_sigmas(config.smoothing, project))
    labels, human = (np.moveaxis(a, axis, 0) for a in project.human_labels())
    target, weight = labels.astype(np.int64), human.astype(np.float32)
    if pseudo_round:
        pseudo = np.moveaxis(np.asarray(project.pseudo_labels(pseudo_round)[...]), axis, 0)
        conf = np.moveaxis(np.asarray(project.confidence(pseudo_round)[...]), axis, 0)
        use = confident_pseudo_labels(
            pseudo, conf, ~human, config.pseudo_threshold, config.pseudo_class_share
        )
        target[use], weight[use] = pseudo[use], config.pseudo_weight
    return image, target, weight


@pytest.mark.parametrize("axis", [0, 1])
def test_slices_on_demand_equal_the_whole_volume(tmp_path, tiny_config, axis):
    image, labels = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image, axis=axis, voxel_size=(2.0, 0.5, 0.5))
    project.annotate_slices(labels, [3, 20] if axis else [2, 5])
    config = tiny_config(iterations=6, labelled_batch=2)  # BatchNorm at 1 x 1 needs 2
    run_round(project, config)  # axis 1: 8 x 32 slices, so crops must stay square
    # A partial correction (the rest of that slice stays unannotated).
    region = [slice(4, 6), slice(8, 12), slice(8, 12)]
    region[axis] = slice(7, 8)
    project.apply_edit("correction", region, labels[tuple(region)], round=1)

    for pseudo_round in (0, 1):
        data = load_training_set(project, config, pseudo_round=pseudo_round, cache_bytes=5000)
        for name, expected in zip(
            ("image", "target", "weight"),
            whole_volume_arrays(project, config, pseudo_round),
            strict=True,
        ):
            view = getattr(data, name)
            np.testing.assert_array_equal(np.asarray(view), expected, err_msg=name)
            np.testing.assert_array_equal(view[[4, 1, 4]], expected[[4, 1, 4]])
            np.testing.assert_array_equal(view[-1], expected[-1])
        human = sorted({3, 20, 7} if axis else {2, 5, 7})
        assert data.human_slices == human
        weight = whole_volume_arrays(project, config, pseudo_round)[2]
        has_pseudo = [i for i in np.flatnonzero(weight.any(axis=(1, 2))) if i not in human]
        assert data.pseudo_slices == has_pseudo and (pseudo_round == 0) == (not has_pseudo)
        # The cache holds a few slices, never the volume (one 8 x 32 x 32 slice: 4 kB).
        assert data.image._cache._bytes <= 5000 + 4 * 32 * 32


def test_streamed_pseudo_label_floors_equal_one_block():
    rng = np.random.default_rng(1)
    pseudo = (rng.random((9, 16, 16)) < 0.3).astype(np.uint16)
    confidence = rng.random((9, 16, 16)).astype(np.float32)
    free = rng.random((9, 16, 16)) < 0.8

    def blocks(step):
        return lambda: (
            (pseudo[i : i + step], confidence[i : i + step], free[i : i + step])
            for i in range(0, 9, step)
        )

    # 100 samples per class: a strided subsample that must continue across blocks.
    whole, whole_peaks = pseudo_label_floors(blocks(9), 0.9, 0.5, max_samples=100)
    for step in (1, 2, 4):
        floors, peaks = pseudo_label_floors(blocks(step), 0.9, 0.5, max_samples=100)
        np.testing.assert_array_equal(floors, whole)
        np.testing.assert_array_equal(peaks, whole_peaks)
    assert whole.dtype == np.float32 and (whole < 0.9).all()
    expected_peak = np.where(free & (pseudo == 1), confidence, -np.inf).max(axis=(1, 2))
    np.testing.assert_array_equal(whole_peaks[:, 1], expected_peak)


def test_streamed_pseudo_label_floors_keep_no_block_alive():
    """Only the strided samples may outlive a block: a strided *view* kept each block's
    values alive, the whole confidence volume by the end (5.3 GB at 256 x 2048^2)."""
    import tracemalloc

    block_shape = (1, 512, 512)  # ~1.8 MB per block (pseudo, confidence, free, values)

    def blocks():
        rng = np.random.default_rng(0)
        for _ in range(60):  # ~110 MB streamed in all
            pseudo = (rng.random(block_shape) < 0.3).astype(np.uint16)
            confidence = rng.random(block_shape, np.float32)
            yield pseudo, confidence, np.ones(block_shape, bool)

    tracemalloc.start()
    try:
        pseudo_label_floors(blocks, 0.9, 0.5, max_samples=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 30e6, f"peak {peak / 1e6:.0f} MB: blocks were kept"


def test_strokes_after_loading_do_not_reach_the_round(tiny_project, tiny_config):
    project, _, labels = tiny_project
    data = load_training_set(project, tiny_config())
    project.annotate_slices(labels, [6])  # painted while the round trains
    assert data.human_slices == [1, 4]
    assert not data.weight[6].any() and not data.target[6].any()
    assert data.weight[4].all()  # a human slice read after the stroke: the snapshot


def test_sampler_batches_from_views(tiny_project, tiny_config):
    project, _, _ = tiny_project
    for mode in ("2d", "2.5d", "3d"):
        config = tiny_config(mode=mode, patch_size=64 if mode == "3d" else 32)
        sampler = TwoStreamSampler(load_training_set(project, config), config)
        labelled, unlabelled = sampler.labelled(), sampler.unlabelled()
        assert labelled.image.shape[0] == 1 and labelled.weight.sum() > 0
        assert unlabelled.target is None and unlabelled.image.shape == labelled.image.shape


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_plain_tensor_augmentation_equals_metatensor_augmentation(tiny_project, tiny_config, mode):
    """The sampler augments without MONAI's metadata tracking (for speed): its batches
    equal, draw for draw, those of the same transforms with tracking on, and the global
    tracking switch is left as it was."""
    from monai.data import get_track_meta

    project, _, _ = tiny_project
    config = tiny_config(mode=mode, patch_size=64 if mode == "3d" else 32, seed=3)
    fast = TwoStreamSampler(load_training_set(project, config), config)
    tracked = TwoStreamSampler(load_training_set(project, config), config)
    tracked._augment = tracked.transform  # MONAI's default: MetaTensors
    for _ in range(6):
        pairs = [(fast.labelled(), tracked.labelled())]
        pairs.append((fast.unlabelled(), tracked.unlabelled()))
        for a, b in pairs:
            for field in ("image", "target", "weight"):
                x, y = getattr(a, field), getattr(b, field)
                if x is None:
                    assert y is None
                else:
                    assert type(x) is torch.Tensor and torch.equal(x, y)
    assert get_track_meta()


def test_slice_array_rejects_what_it_cannot_index(tiny_project, tiny_config):
    project, _, _ = tiny_project
    data = load_training_set(project, tiny_config())
    with pytest.raises(IndexError, match="out of range"):
        data.image[8]
    with pytest.raises(TypeError, match="an int, a slice or a list"):
        data.image[data.weight[0] > 0]


def test_dropping_the_cache_keeps_the_values(tiny_project, tiny_config):
    project, _, _ = tiny_project
    data = load_training_set(project, tiny_config())
    image, weight = data.image[[1, 4]], data.weight[[1, 4]]
    data.drop_cache()
    assert data.image._cache._bytes == 0 and data.weight._cache._bytes == 0
    np.testing.assert_array_equal(data.image[[1, 4]], image)
    np.testing.assert_array_equal(data.weight[[1, 4]], weight)


def test_3d_samples_read_only_the_crop_window(tmp_path, tiny_config):
    """A 3D cube keeps each slice's in-plane crop window, not whole slices (a cube of 16
    whole 2048^2 slices held ~800 MB of image, target and weight), and its crops still
    come from all over the plane."""
    import tracemalloc

    image, labels = disks_volume(shape=(16, 512, 512))
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [4, 12], source="test")
    config = tiny_config(mode="3d", patch_size=64)  # cubes of 32^3
    sampler = TwoStreamSampler(load_training_set(project, config), config)
    sampler.labelled()  # fills the slice cache (bounded, and not what is measured)
    tracemalloc.start()
    try:
        batch = sampler.labelled()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tuple(batch.image.shape) == (1, 1, 16, 32, 32)  # depth: the volume's 16
    # Whole slices: 16 x 512^2 x (4 + 8 + 4) bytes = 67 MB; windows: ~0.3 MB.
    assert peak < 8e6, f"peak {peak / 1e6:.1f} MB: whole slices were read into the cube"
    corners = {tuple(s.start for s in sampler._window((512, 512))) for _ in range(50)}
    assert len(corners) > 40 and max(max(c) for c in corners) > 240


@pytest.mark.parametrize("axis", [0, 1])
def test_windows_equal_cuts_of_whole_slices(tmp_path, tiny_config, axis):
    """A windowed set (slices too big to cache) reads each crop's window, plus the
    smoothing's halo, from the project: the same voxels as whole slices cut, at the
    plane's edges too, with and without an earlier round's pseudo-labels."""
    image, labels = disks_volume(shape=(10, 40, 36))
    project = Project.create(tmp_path / "p.zarr", image, axis=axis, voxel_size=(2.0, 0.5, 0.5))
    project.annotate_slices(labels, [3, 25] if axis else [2, 6])
    # In-plane halo 5 px; across, 1 slice on axis 0 and 11 on axis 1 (the voxel size).
    config = tiny_config(iterations=4, labelled_batch=2, smoothing=1.5)
    run_round(project, config)
    region = [slice(4, 7), slice(9, 20), slice(5, 30)]
    region[axis] = slice(7, 8)  # a partial correction
    project.apply_edit("correction", region, labels[tuple(region)], round=1)

    # 3000 bytes: every window read from the project; 40 kB: the volume's prepared labels
    # (115 kB) do not fit, its 3 human slices' (35 kB, 9 kB on axis 1) do; 60 kB: the
    # image (58 kB) would fit, the labels still do not (a thrashed labels cache).
    for pseudo_round, cache_bytes in [(0, 3000), (1, 3000), (1, 40_000), (1, 60_000)]:
        data = load_training_set(
            project, config, pseudo_round=pseudo_round, cache_bytes=cache_bytes
        )
        assert data.windowed
        assert data.cut_from_cache == (set(data.human_slices) if cache_bytes > 3000 else set())
        whole = [np.asarray(getattr(data, name)) for name in ("image", "target", "weight")]
        n, height, width = whole[0].shape
        human = data.human_slices[0]
        for lo, hi, rows, cols in [
            (0, n, slice(0, height), slice(0, width)),  # everything
            (1, 4, slice(3, 11), slice(6, 13)),  # inside, the halo read on every side
            (n - 2, n, slice(height - 5, height + 20), slice(0, 9)),  # past the edge
            (human, human + 1, slice(2, 30), slice(1, 20)),  # a human slice
            (7, 8, slice(0, 8), slice(4, 36)),  # the corrected slice
        ]:
            parts = data.window(lo, hi, rows, cols)
            for part, expected in zip(parts, whole, strict=True):
                np.testing.assert_array_equal(part, expected[lo:hi, rows, cols])
            (image_only,) = data.window(lo, hi, rows, cols, labels=False)
            np.testing.assert_array_equal(image_only, parts[0])


def test_2d_samples_of_big_slices_read_only_windows(tmp_path, tiny_config):
    """Slices too big for the cache: a 2D or 2.5D crop reads its window, not whole
    slices (a 96^2 crop of a 2048^2 slice read, normalised and smoothed 7 whole slices)."""
    import tracemalloc

    image, labels = disks_volume(shape=(12, 1024, 1024))
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [4, 9], source="test")
    for mode in ("2d", "2.5d"):
        config = tiny_config(mode=mode, labelled_batch=2, unlabelled_batch=2)
        data = load_training_set(project, config, cache_bytes=2**22)  # 96 MB of labels
        sampler = TwoStreamSampler(data, config)
        assert data.windowed
        for draw in ("labelled", "unlabelled"):
            tracemalloc.start()
            try:
                batch = getattr(sampler, draw)()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert tuple(batch.image.shape) == (2, 3 if mode == "2.5d" else 1, 32, 32)
            # Whole slices: 30-44 MB. A window still decompresses its 512^2 chunks
            # (7 slices with the smoothing's halo): ~5 MB.
            assert peak < 12e6, f"{mode}, {draw}: {peak / 1e6:.0f} MB, whole slices read"


@pytest.mark.parametrize("mode", ["2d", "2.5d", "3d"])
def test_round_on_a_windowed_set(tmp_path, tiny_config, monkeypatch, mode):
    """The engine's round trains from windows when the slices do not fit the cache."""
    from napari_ssl_seg import data as data_module

    monkeypatch.setattr(data_module, "TRAINING_CACHE_BYTES", 20_000)
    image, labels = disks_volume(shape=(8, 48, 48))
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [2, 5], source="test")
    config = tiny_config(
        mode=mode, iterations=4, labelled_batch=2, patch_size=64 if mode == "3d" else 32
    )
    assert load_training_set(project, config).windowed
    record = run_round(project, config)
    assert record["round"] == 1 and project.pseudo_labels(1).shape == image.shape
    np.testing.assert_array_equal(project.final[[2, 5]], labels[[2, 5]])
