"""Inference helpers: background calibration, tiling, BatchNorm recalibration, ranking."""

from __future__ import annotations

import numpy as np
import torch

from napari_ssl_seg.engine import build_method
from napari_ssl_seg.inference import (
    adjust_background,
    calibrate_background_bias,
    predict_probabilities,
    rank_slices,
    recalibrate_batchnorm,
)


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


def test_recalibration_averages_the_batches(tiny_config):
    method = _method(tiny_config)
    batches = [torch.rand(2, 1, 32, 32) + 5.0 for _ in range(3)]
    n = recalibrate_batchnorm(method, batches)
    first = next(m for m in method.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert n > 0 and first.momentum == 0.1  # momentum restored
    assert first.running_mean.abs().sum() > 0 and first.num_batches_tracked == 3


def test_rank_slices_skips_fully_human_slices():
    scores = np.array([0.1, np.nan, 0.3, 0.2])
    assert [r["slice"] for r in rank_slices(scores, min_gap=1)] == [2, 3, 0]
    assert [r["slice"] for r in rank_slices(scores)] == [2]
