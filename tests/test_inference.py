"""Inference helpers: background calibration, tiling, BatchNorm recalibration, ranking, vote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_ssl_seg.engine import build_method
from napari_ssl_seg.inference import (
    adjust_background,
    calibrate_background_bias,
    predict_probabilities,
    rank_slices,
    recalibrate_batchnorm,
)
from napari_ssl_seg.methods import NetworkConfig, SSLMethod


def _method(tiny_config, **kw):
    torch.manual_seed(0)
    return build_method(tiny_config(**kw), num_classes=2)


def test_adjust_background_moves_the_boundary():
    probs = torch.tensor([[[[0.4]], [[0.6]]]])  # (B=1, K=2, 1, 1)
    assert torch.equal(adjust_background(probs, 0.0), probs)
    shifted = adjust_background(probs, 1.0)
    assert shifted[0, 0, 0, 0] > 0.6 and torch.allclose(shifted.sum(1), torch.ones(1, 1, 1))


def test_calibrated_bias_never_scores_worse_than_none(tiny_config):
    from conftest import disks_volume

    image, labels = disks_volume()
    method = _method(tiny_config)
    x = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    weight = np.zeros(labels.shape, np.float32)
    weight[[2, 5]] = 1
    bias = calibrate_background_bias(
        method, x, labels.astype(np.int64), weight, [2, 5], mode="2d", device=torch.device("cpu")
    )
    assert -3 <= bias <= 3

    def human_dice(b):
        probs = adjust_background(
            predict_probabilities(method, torch.from_numpy(x[[2, 5]][:, None])), b
        )
        pred, truth = probs.argmax(1).numpy() > 0, labels[[2, 5]] > 0
        return 2 * (pred & truth).sum() / max(1, pred.sum() + truth.sum())

    assert human_dice(bias) >= human_dice(0.0) - 1e-9


def test_calibration_is_the_same_one_slice_at_a_time(tiny_config, monkeypatch):
    """Many corrected slices go through the network in batches of one tile's worth of
    voxels; the counts summed over batches give the bias of all slices at once."""
    from conftest import disks_volume

    import napari_ssl_seg.inference as inference

    image, labels = disks_volume()
    method = _method(tiny_config)
    x = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    weight = np.ones(labels.shape, np.float32)
    # The untrained net's fg - bg log-odds are 0.362-0.372 on every voxel: biases in that
    # range split the voxels, so each one scores differently.
    grid = np.round(np.linspace(0.36, 0.375, 61), 5)

    def fitted(slices, voxels_per_batch):
        monkeypatch.setattr(inference, "VOXELS_PER_BATCH", voxels_per_batch)
        return calibrate_background_bias(
            method, x, labels.astype(np.int64), weight, slices,
            mode="2d", device=torch.device("cpu"), grid=grid,
        )  # fmt: skip

    one_slice = int(np.prod(labels.shape[1:]))
    assert fitted([3, 4, 2], one_slice) == fitted([3, 4, 2], 10**9)
    # Slice 1 holds no nucleus: fitted on it alone the answer is "no bias" (0, not in
    # the grid), so a bias from the grid shows that slice 2's counts were kept.
    assert not labels[1].any() and labels[2].any()
    bias = fitted([2, 1], one_slice)
    assert bias in grid and bias == fitted([2, 1], 10**9)


def test_calibration_picks_the_best_bias_on_human_voxels_only(tiny_config):
    """Brute force over the grid on partly annotated slices: the fitted bias is the one
    whose Dice over the human voxels (weight 1) is highest, nearest 0 among ties."""
    from conftest import disks_volume

    image, labels = disks_volume()
    method = _method(tiny_config)
    x = ((image - image.min()) / np.ptp(image)).astype(np.float32)
    weight = np.zeros(labels.shape, np.float32)
    weight[2:6, :, :20] = 1  # the left part of 4 slices; the rest must not count
    grid = np.round(np.linspace(0.36, 0.375, 61), 5)  # see the test above
    bias = calibrate_background_bias(
        method, x, labels.astype(np.int64), weight, [2, 3, 4, 5],
        mode="2d", device=torch.device("cpu"), grid=grid,
    )  # fmt: skip
    probs = predict_probabilities(method, torch.from_numpy(x[2:6][:, None]))
    human, truth = weight[2:6] >= 1, labels[2:6] > 0

    def human_dice(b):
        pred = adjust_background(probs, float(b)).argmax(1).numpy() > 0
        p, t = pred[human], truth[human]
        return 2 * (p & t).sum() / (p.sum() + t.sum())

    scores = {float(b): human_dice(b) for b in sorted(grid, key=abs)}
    best = max(scores.values())
    assert len(set(scores.values())) > 3  # the grid splits the voxels
    assert bias == next(b for b, score in scores.items() if score > best - 1e-6)


def test_no_foreground_means_no_bias(tiny_config):
    method = _method(tiny_config)
    x = np.random.default_rng(0).random((3, 32, 32)).astype(np.float32)
    zeros = np.zeros((3, 32, 32))
    assert (
        calibrate_background_bias(
            method,
            x,
            zeros.astype(np.int64),
            zeros + 1,
            [0, 1],
            mode="2d",
            device=torch.device("cpu"),
        )
        == 0.0
    )


def test_sliding_window_for_large_slices(tiny_config):
    method = _method(tiny_config)
    x = torch.rand(1, 1, 80, 72)
    whole = predict_probabilities(method, x, tile=512)
    tiled = predict_probabilities(method, x, tile=32)
    assert whole.shape == tiled.shape == (1, 2, 80, 72)
    assert torch.allclose(tiled.sum(1), torch.ones(1, 80, 72), atol=1e-4)


@pytest.mark.parametrize("tile, margin", [(512, 64), (96, 12), (32, 64)])
def test_tile_layout_covers_with_the_fewest_overlapping_windows(tile, margin):
    """Laid out by MONAI's own sliding-window code, the windows start at 0, end at the
    edge, overlap by at least the margin, and are as few as windows of at most ``tile``
    overlapping by the margin can be (MONAI's 0.25 overlap put 3 x 3 windows of 512 on a
    1024^2 slice)."""
    import itertools
    import math

    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    from napari_ssl_seg.inference import tile_layout

    margin = min(margin, tile // 2)
    assert tile_layout(tile, tile, margin) == (tile, 0.0)
    for size in range(tile + 1, 6 * tile):
        side, overlap = tile_layout(size, tile, margin)
        step = _get_scan_interval([size], [side], 1, [overlap])[0]
        starts = [index[0].start for index in dense_patch_slices([size], [side], [step])]
        assert side <= tile and side % 16 == 0
        assert starts[0] == 0 and starts[-1] + side == size
        assert min(a + side - b for a, b in itertools.pairwise(starts)) >= margin
        assert len(starts) == math.ceil((size - margin) / (tile - margin))
    assert tile_layout(1024, 512, 64)[0] == 384  # 3 windows of 384 (9 of 384^2 a slice)


def test_recalibration_averages_the_batches(tiny_config):
    method = _method(tiny_config, norm="batch")
    batches = [torch.rand(2, 1, 32, 32) + 5.0 for _ in range(3)]
    n = recalibrate_batchnorm(method, batches)
    first = next(m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert n > 0 and first.momentum == 0.1  # momentum restored
    assert first.running_mean.abs().sum() > 0 and first.num_batches_tracked == 3


def test_recalibration_without_batch_norm_draws_no_batch(tiny_config):
    drawn = []

    def batches():
        while True:
            drawn.append(1)
            yield torch.rand(2, 1, 32, 32)

    assert recalibrate_batchnorm(_method(tiny_config, norm="none"), batches()) == 0
    assert not drawn


def test_rank_slices_skips_fully_human_slices():
    scores = np.array([0.1, np.nan, 0.3, 0.2])
    assert [r["slice"] for r in rank_slices(scores, min_gap=1)] == [2, 3, 0]
    assert [r["slice"] for r in rank_slices(scores)] == [2]


def _slabs_of(labels, confidence, size):
    for start in range(0, len(labels), size):
        stop = min(start + size, len(labels))
        yield start, stop, labels[start:stop], confidence[start:stop]


def _vote(labels, confidence, size, window=(5, 5, 5), num_classes=3):
    from napari_ssl_seg.inference import majority_vote

    out = list(
        majority_vote(
            _slabs_of(labels, confidence, size), len(labels), window, num_classes=num_classes
        )
    )
    starts = [s for s, *_ in out]
    assert starts == sorted(starts) and out[0][0] == 0 and out[-1][1] == len(labels)
    assert all(a[1] == b[0] for a, b in zip(out[:-1], out[1:], strict=True))  # consecutive, no gap
    return np.concatenate([o[2] for o in out]), np.concatenate([o[3] for o in out])


def test_majority_vote_removes_speckle_and_keeps_steps():
    labels = np.zeros((12, 20, 20), np.uint16)
    labels[6:, 4:16, 4:16] = 1  # an object starting at slice 6: a sharp step along z
    labels[2, 10, 10] = 2  # speckle of a third class
    labels[8, 8, 8] = 0  # a hole
    confidence = np.full(labels.shape, 0.9, np.float32)
    voted, conf = _vote(labels, confidence, size=12)
    assert (voted[6:, 6:14, 6:14] == 1).all()  # the step along z stays where it is
    assert (voted[:, 4, 4] == 0).all()  # a corner column: only 4 of 25 in-plane voxels
    assert voted[2, 10, 10] == 0 and voted[8, 8, 8] == 1 and (voted[:6] == 0).all()
    assert conf[8, 8, 8] > 0.5 and conf[8, 8, 8] != np.float32(0.9)  # share of the window
    assert conf[0, 0, 0] == np.float32(0.9)  # unchanged voxels keep the net's confidence


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7])
def test_majority_vote_streams_like_the_whole_volume(size):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (11, 16, 16)).astype(np.uint16)
    confidence = rng.random(labels.shape).astype(np.float32)
    whole = _vote(labels, confidence, size=11)
    streamed = _vote(labels, confidence, size=size)
    assert np.array_equal(whole[0], streamed[0]) and np.array_equal(whole[1], streamed[1])


def test_majority_vote_ties_keep_the_own_label_and_bad_windows_fail():
    labels = np.array([[[0, 1, 2]]], np.uint16)  # the middle voxel sees one of each class
    voted, _ = _vote(labels, np.ones(labels.shape, np.float32), 1, (1, 1, 3), 3)
    assert np.array_equal(voted, labels)
    with pytest.raises(ValueError, match="odd and >= 1"):
        _vote(labels, np.ones(labels.shape, np.float32), 1, (1, 2, 3), 2)


def test_smoothing_matches_scipy_and_blocks_with_a_halo():
    from scipy import ndimage as ndi

    from napari_ssl_seg.data import SMOOTHING_TRUNCATE, smooth, smoothing_halo

    volume = np.random.default_rng(0).random((12, 5, 6)).astype(np.float32)
    for sigmas in ((0.6, 1.0), (1.0, 0.0), (1.7, 0.8), (0.0, 1.2)):
        expected = ndi.gaussian_filter(
            volume, (sigmas[0], sigmas[1], sigmas[1]), mode="nearest", truncate=SMOOTHING_TRUNCATE
        )
        assert np.allclose(smooth(volume, sigmas), expected, atol=1e-6)
        halo = smoothing_halo(sigmas)
        for start, stop in ((0, 3), (4, 7), (9, 12)):
            lo, hi = max(0, start - halo), min(12, stop + halo)
            part = smooth(volume[lo:hi], sigmas, slice(start - lo, stop - lo))
            assert np.allclose(part, expected[start:stop], atol=1e-6)
    assert np.array_equal(smooth(volume, (0.0, 0.0)), volume)


def test_smoothing_sigmas_follow_the_voxel_size(tmp_path):
    from napari_ssl_seg.data import smoothing_sigmas
    from napari_ssl_seg.store import Project

    image = np.ones((4, 8, 8), np.uint16)
    thick = Project.create(tmp_path / "a.zarr", image, voxel_size=(2.0, 0.5, 0.5))
    plain = Project.create(tmp_path / "b.zarr", image)
    assert smoothing_sigmas(1.0, thick) == pytest.approx((0.25, 1.0))  # thick: barely across
    assert smoothing_sigmas(1.0, plain) == (1.0, 1.0)
    assert smoothing_sigmas(0.0, thick) == (0.0, 0.0)


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_smoothed_prediction_streams_like_the_whole_volume(tmp_path, tiny_config, mode):
    from conftest import disks_volume

    from napari_ssl_seg.inference import predict_into_round
    from napari_ssl_seg.store import Project

    image, _ = disks_volume(shape=(9, 32, 32))
    project = Project.create(tmp_path / "p.zarr", image)
    method = _method(tiny_config, mode=mode)
    norm = (float(image.min()), float(image.max()))

    def predict(voxels_per_batch, smoothing):
        writer = project.begin_round()
        scores = predict_into_round(
            project,
            method,
            writer,
            norm=norm,
            mode=mode,
            device=torch.device("cpu"),
            smoothing=smoothing,
            voxels_per_batch=voxels_per_batch,
        )
        for _ in scores:
            pass
        return np.asarray(writer.confidence[...])

    one_slice_at_a_time = predict(32 * 32, (1.3, 0.8))
    whole_volume = predict(9 * 32 * 32, (1.3, 0.8))
    assert np.allclose(one_slice_at_a_time, whole_volume, atol=1e-5)
    assert not np.array_equal(whole_volume, predict(9 * 32 * 32, (0.0, 0.0)))  # it smoothed


class _VoxelwiseMethod(SSLMethod):
    """A 3D 'network' that looks at each voxel alone (a 1 x 1 x 1 convolution).

    With no receptive field, predicting a volume block by block must give exactly what
    predicting it whole gives, whatever the blocks' context: any difference is a
    bookkeeping error (a block read, smoothed or cropped at the wrong place).
    """

    def __init__(self) -> None:
        super().__init__(
            in_channels=1,
            num_classes=2,
            spatial_dims=3,
            total_iterations=1,
            network=NetworkConfig(),
            settings=None,
        )
        self.conv = torch.nn.Conv3d(1, 2, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([-8.0, 8.0]).view(2, 1, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([4.0, -4.0]))

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        return self.conv(image).softmax(1)


def _predict_3d(project, method, blocks=None, **kw):
    """The 3D-mode output written into a new round: (labels, confidence)."""
    from napari_ssl_seg.inference import _predict_3d_into

    image = np.asarray(project.image[...])
    writer = project.begin_round()
    reports = list(
        _predict_3d_into(
            project,
            method,
            writer,
            norm=(float(image.min()), float(image.max())),
            device=torch.device("cpu"),
            smoothing=(1.3, 0.8),
            blocks=blocks,
            **kw,
        )
    )
    n = project.n_slices
    assert reports[-1] == {"phase": "predict", "iteration": n, "total": n}
    assert len(reports) == (1 if blocks is None else len(blocks))  # one report a block
    return np.asarray(writer.pseudo[...]), np.asarray(writer.confidence[...])


def _columns(sizes, depth, tile):
    """Blocks ``depth`` slices deep and ``tile`` wide in-plane covering ``sizes``."""
    from napari_ssl_seg.inference import _slabs

    n, h, w = sizes
    return [(z, y, x) for z in _slabs(n, depth) for y in _slabs(h, tile) for x in _slabs(w, tile)]


@pytest.mark.parametrize("axis", [0, 1])
def test_3d_prediction_block_by_block_equals_the_whole_volume(tmp_path, axis):
    """A volume larger than one block goes through the network in small blocks (bounded
    memory), with the smoothing computed exactly as on the whole volume."""
    from conftest import disks_volume

    from napari_ssl_seg.store import Project

    image, _ = disks_volume(shape=(10, 40, 36))
    project = Project.create(tmp_path / "p.zarr", image, axis=axis)
    method = _VoxelwiseMethod()
    whole_labels, whole_confidence = _predict_3d(project, method)  # small: one block
    assert 0 < whole_labels.mean() < 1  # both classes present
    assert (whole_confidence >= 0.5).all()  # every voxel written (2 classes)

    sizes = (project.n_slices, *(s for i, s in enumerate(project.shape) if i != axis))
    blocks = _columns(sizes, 3, 16)
    labels, confidence = _predict_3d(project, method, blocks, halo=2)
    np.testing.assert_array_equal(labels, whole_labels)
    np.testing.assert_allclose(confidence, whole_confidence, atol=1e-6)


def test_3d_prediction_blocks_with_a_real_network(tmp_path, tiny_config):
    """A trained-size 3D UNet, blocks whose context covers the volume: the same output."""
    from conftest import disks_volume

    from napari_ssl_seg.store import Project

    image, _ = disks_volume(shape=(8, 32, 32))
    project = Project.create(tmp_path / "p.zarr", image)
    method = _method(tiny_config, mode="3d")
    whole_labels, whole_confidence = _predict_3d(project, method)
    labels, confidence = _predict_3d(project, method, _columns((8, 32, 32), 2, 16), halo=32)
    np.testing.assert_array_equal(labels, whole_labels)
    np.testing.assert_allclose(confidence, whole_confidence, atol=1e-5)


def test_3d_blocks_run_deep_in_narrow_columns():
    """On a big volume the context is a small share of what the blocks read (the old
    layout, 4 whole 2048^2 slices a block, read 9x what it predicted); a small volume
    goes whole."""
    from napari_ssl_seg.data import grown_ranges
    from napari_ssl_seg.inference import HALO_3D, VOXELS_PER_3D_BLOCK, _blocks_3d

    sizes = (256, 2048, 2048)
    blocks = _blocks_3d(sizes, VOXELS_PER_3D_BLOCK, HALO_3D)
    predicted = np.zeros((256, 16, 16), np.int64)  # per slice, per 128 x 128 square
    read = 0
    for block in blocks:
        (z0, z1), (y0, y1), (x0, x1) = block
        predicted[z0:z1, y0 // 128 : y1 // 128, x0 // 128 : x1 // 128] += 1
        reads = grown_ranges(block, (HALO_3D,) * 3, sizes)
        voxels = int(np.prod([b - a for a, b in reads]))
        assert voxels <= VOXELS_PER_3D_BLOCK
        read += voxels
    assert (predicted == 1).all()  # every voxel predicted once
    assert read / np.prod(sizes) < 1.8
    whole = [((0, 60), (0, 256), (0, 256))]
    assert _blocks_3d((60, 256, 256), VOXELS_PER_3D_BLOCK, HALO_3D) == whole


@pytest.mark.parametrize("axis", [0, 2])
def test_3d_second_pass_votes_on_the_unvoted_output(tmp_path, monkeypatch, axis):
    """The vote rewrites the round's arrays in place, slab by slab: each slice must be
    voted from its neighbours' network output, never from already voted neighbours."""
    from conftest import disks_volume

    from napari_ssl_seg import inference
    from napari_ssl_seg.inference import predict_into_round, vote_volume
    from napari_ssl_seg.store import Project

    image, _ = disks_volume(shape=(10, 40, 36))
    project = Project.create(tmp_path / "p.zarr", image, axis=axis)
    method = _VoxelwiseMethod()
    raw, _ = _predict_3d(project, method)  # the network's output, unvoted
    raw = np.moveaxis(raw, axis, 0)

    monkeypatch.setattr(inference, "VOXELS_PER_BATCH", 1)  # the second pass: 1-slice slabs
    window = (3, 5, 5)
    image_norm = (float(image.min()), float(image.max()))
    writer = project.begin_round()
    phases = [
        (r["phase"], r["iteration"])
        for r in predict_into_round(
            project,
            method,
            writer,
            norm=image_norm,
            mode="3d",
            device=torch.device("cpu"),
            smoothing=(1.3, 0.8),
            vote_window=window,
        )
    ]
    n = project.n_slices
    assert phases[0] == ("predict", n) and phases[-1] == ("write", n)
    assert len(phases) == 1 + n - window[0] // 2  # the vote's first slab waits for context
    voted = np.moveaxis(np.asarray(writer.pseudo[...]), axis, 0)
    expected = vote_volume(raw, window, num_classes=2)
    assert not np.array_equal(expected, raw)  # the vote changed something
    np.testing.assert_array_equal(voted, expected)


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_forest_and_ensemble_are_written_slab_by_slab(tmp_path, tiny_config, mode):
    from conftest import disks_volume

    from napari_ssl_seg.data import normalise, slice_stack, smooth
    from napari_ssl_seg.forest import ForestSettings, fit_forest_on_slices
    from napari_ssl_seg.inference import predict_into_round
    from napari_ssl_seg.store import Project

    image, labels = disks_volume(shape=(9, 32, 32))
    project = Project.create(tmp_path / "p.zarr", image)
    method = _method(tiny_config, mode=mode)
    norm, sigmas = (float(image.min()), float(image.max())), (1.0, 1.0)
    volume = smooth(normalise(image, norm), sigmas)  # what the network and the forest see
    forest = fit_forest_on_slices(
        volume, labels, [3, 6], num_classes=2, settings=ForestSettings(trees=3, depth=4)
    )

    def written(source):
        writer = project.begin_round()
        for _ in predict_into_round(
            project,
            method,
            writer,
            norm=norm,
            mode=mode,
            device=torch.device("cpu"),
            smoothing=sigmas,
            voxels_per_batch=2 * 32 * 32,  # slabs of 2 slices
            source=source,
            forest=forest,
        ):
            pass
        out = np.asarray(writer.pseudo[...]), np.asarray(writer.confidence[...])
        writer.abort()
        return out

    trees = forest.predict_proba(volume)  # (S, K, H, W), the whole volume at once
    labels_f, confidence_f = written("forest")
    np.testing.assert_array_equal(labels_f, trees.argmax(1))
    np.testing.assert_allclose(confidence_f, trees.max(1), atol=1e-6)
    x = torch.from_numpy(slice_stack(volume, np.arange(9), mode))
    mean = (predict_probabilities(method, x).numpy() + trees) / 2
    labels_e, confidence_e = written("ensemble")
    np.testing.assert_array_equal(labels_e, mean.argmax(1))
    np.testing.assert_allclose(confidence_e, mean.max(1), atol=1e-5)
    writer = project.begin_round()
    with pytest.raises(ValueError, match="source must be one of .*got 'forest' with forest=False"):
        next(
            predict_into_round(
                project,
                method,
                writer,
                norm=norm,
                mode=mode,
                source="forest",
                device=torch.device("cpu"),
            )
        )
    writer.abort()
