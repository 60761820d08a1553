"""Validation on held-out human labels: the bands, the training set without them, the choice."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ssl_seg.data import load_training_set
from napari_ssl_seg.engine import run_round
from napari_ssl_seg.validation import (
    MIN_HELD_OUT,
    choose,
    class_counts,
    dice_scores,
    holdout_bands,
)


def _human(labels, slices):
    return {i: (labels[i].astype(np.uint16), np.ones(labels[i].shape, bool)) for i in slices}


def test_bands_hold_out_a_quarter_and_rotate_through_every_voxel(tiny_project):
    _, _, labels = tiny_project
    human = _human(labels, [3, 5, 6])
    seen = np.zeros((3, 32, 32), int)
    for rotation in range(4):
        held = holdout_bands(human, 0.25, rotation)
        assert set(held) == {3, 5, 6}
        share = sum(m.sum() for m in held.values()) / (3 * 32 * 32)
        assert 0.2 <= share <= 0.3
        for j, i in enumerate(sorted(held)):
            rows = np.flatnonzero(held[i].any(1))
            assert np.all(np.diff(rows) == 1)  # one band of whole rows
            seen[j] += held[i]
    assert np.all(seen == 1)  # four rounds: every voxel validated once


def test_bands_never_hold_out_all_of_a_class():
    labels = np.zeros((2, 40, 40), np.uint16)
    labels[0, 2:5, 2:5] = 1  # a small class in the first band of one slice only
    labels[1, 32:36, 30:34] = 2  # another in the last band of the other
    human = _human(labels, [0, 1])
    for rotation in range(4):
        held = holdout_bands(human, 0.25, rotation)
        for i, c in ((0, 1), (1, 2)):
            assert (labels[i][human[i][1] & ~held[i]] == c).any()  # always trained on
    labels[0, 8:12, 20:24] = 3  # a class across the first two bands: always validated too
    for rotation in range(4):
        held = holdout_bands(_human(labels, [0, 1]), 0.25, rotation)[0]
        assert (labels[0][held] == 3).any() and (labels[0][~held] == 3).any()


def test_bands_only_cover_human_voxels_and_skip_too_few():
    labels = np.zeros((1, 64, 64), np.uint16)
    mask = np.zeros((64, 64), bool)
    mask[10:50, 20:30] = True  # a partly annotated slice
    held = holdout_bands({0: (labels[0], mask)}, 0.25, 0)[0]
    assert not (held & ~mask).any() and held.sum() == 100
    tiny = np.zeros((64, 64), bool)
    tiny[0, :MIN_HELD_OUT] = True  # a quarter of it would be too few to measure
    assert holdout_bands({0: (labels[0], tiny)}, 0.25, 0) == {}
    assert holdout_bands({0: (labels[0], mask)}, 0.0, 0) == {}
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 0.5\], got 0.7"):
        holdout_bands({0: (labels[0], mask)}, 0.7, 0)


@pytest.mark.parametrize("cache_bytes", [None, 1])  # whole slices, and window by window
def test_held_out_voxels_never_reach_the_loss(tiny_project, tiny_config, cache_bytes):
    project, _, labels = tiny_project
    config = tiny_config()
    run_round(project, config)  # round 1's pseudo-labels may fill voxels no human labelled
    data = load_training_set(project, config, holdout=0.25, rotation=2, cache_bytes=cache_bytes)
    assert data.pseudo_slices  # pseudo-labels are in play
    assert sorted(data.held_out) == [1, 4]
    for i, (truth, held) in data.held_out.items():
        np.testing.assert_array_equal(truth, labels[i])
        assert held.sum() > 0
        _, target, weight = data.window(i, i + 1, slice(None), slice(None))
        assert np.all(weight[0][held] == 0) and np.all(target[0][held] == 0)
        assert np.all(data.weight[i][held] == 0) and np.all(data.target[i][held] == 0)
        assert np.all(data.weight[i][~held] == 1)  # the rest of the slice trains
        assert not data.human[i][1][held].any()
    every = data.human_voxels(held_out=True)
    for i in (1, 4):
        assert every[i][1].all()
        np.testing.assert_array_equal(every[i][0], labels[i])


def test_dice_counts_and_choice():
    truth = np.array([0, 1, 1, 2, 2, 0])
    counts = class_counts(np.array([0, 1, 0, 2, 2, 2]), truth, 3)
    assert counts.tolist() == [[1, 2, 2], [1, 1, 2], [2, 3, 2]]
    scores = dice_scores(counts)
    assert scores == {"dice": {"1": 0.66667, "2": 0.8}, "mean": 0.73333}
    assert dice_scores(class_counts(np.zeros(4, int), np.zeros(4, int), 2))["mean"] is None
    s = lambda m: {"dice": {}, "mean": m}  # noqa: E731
    # a step is kept only where it raises the Dice; ties go to the ensemble
    assert choose({"network": s(0.8), "network+vote": s(0.8), "forest": s(0.7)})[0] == "network"
    assert choose({"network": s(0.8), "forest+vote": s(0.9), "ensemble": s(0.9)})[0] == "ensemble"
    name, why = choose({"network": s(0.6), "forest": s(0.9)})
    assert name == "forest" and why == "best held-out Dice 0.900 (best forest 0.900)"
    with pytest.raises(ValueError, match="no candidate"):
        choose({})


def test_a_round_never_ships_worse_than_the_forest(tiny_project, tiny_config):
    """3 iterations of a tiny network are far from the disks; the forest finds them."""
    project, _, labels = tiny_project
    record = run_round(project, tiny_config(iterations=3, seed=0))
    validation, chosen = record["validation"], record["chosen"]
    scores = validation["candidates"]
    network = max(v["mean"] for k, v in scores.items() if k.startswith("network"))
    forest = max(v["mean"] for k, v in scores.items() if k.startswith("forest"))
    assert network < forest - 0.1  # the case is what it claims to be
    assert chosen["source"] in ("forest", "ensemble")
    assert scores[chosen["candidate"]]["mean"] >= forest
    assert record["source"] == chosen["source"]
    # what the round wrote scores at least the forest's validation Dice on the band
    written = np.asarray(project.pseudo_labels(1)[...])
    overlap = predicted = true = 0
    held_rotation = holdout_bands(_human(labels, [1, 4]), 0.25, rotation=0 + 0 + 1)
    assert validation["held_out_voxels"] == sum(int(m.sum()) for m in held_rotation.values())
    for i, held in held_rotation.items():
        p, t = written[i][held] == 1, labels[i][held] == 1
        overlap, predicted, true = overlap + (p & t).sum(), predicted + p.sum(), true + t.sum()
    assert 2 * overlap / (predicted + true) >= forest


def test_the_estimate_is_in_the_round_record(tiny_project, tiny_config):
    project, _, _ = tiny_project
    record = run_round(project, tiny_config())
    assert project.round_record(1)["validation"] == record["validation"]
    validation = record["validation"]
    assert 0.2 <= validation["held_out_fraction"] <= 0.3
    assert validation["held_out_slices"] == [1, 4]
    names = set(validation["candidates"])
    assert {"network", "forest", "ensemble", "network+bias+vote"} <= names or {
        "network",
        "forest",
        "ensemble",
        "network+vote",
    } <= names
    for score in validation["candidates"].values():
        assert set(score) == {"dice", "mean"} and set(score["dice"]) <= {"1"}
    chosen = record["chosen"]
    assert chosen["candidate"] in names and chosen["why"].startswith("best held-out Dice")
    assert chosen["dice"] == validation["candidates"][chosen["candidate"]]


def test_without_held_out_voxels_the_round_writes_the_network(tiny_project, tiny_config):
    project, _, _ = tiny_project
    record = run_round(project, tiny_config(validation_fraction=0.0))
    assert record["validation"] is None
    assert record["chosen"]["source"] == "network" and record["source"] == "network"
    assert "nothing held out" in record["chosen"]["why"]


def test_a_named_output_is_written(tiny_project, tiny_config):
    project, _, _ = tiny_project
    record = run_round(project, tiny_config(output="network"))
    assert record["chosen"]["source"] == "network"
    assert record["chosen"]["why"].startswith("output 'network' asked for")
    assert set(record["validation"]["candidates"]) > {"network", "forest"}  # all scored


@pytest.mark.parametrize("mode", ["2d", "2.5d"])
def test_validation_scores_what_the_round_would_write(tmp_path, tiny_config, mode):
    """Each candidate's held-out Dice equals that of the volume predicted with it."""
    import torch
    from conftest import disks_volume

    from napari_ssl_seg.engine import build_method
    from napari_ssl_seg.inference import predict_into_round
    from napari_ssl_seg.store import Project
    from napari_ssl_seg.validation import fit_round_forest, validate_candidates

    image, labels = disks_volume(shape=(9, 32, 32), seed=3)
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [2, 5], source="test")
    config = tiny_config(mode=mode)
    data = load_training_set(project, config, holdout=0.25, rotation=1)
    torch.manual_seed(0)
    method = build_method(config, num_classes=2)
    forest = fit_round_forest(data, held_out=False, n_jobs=1, seed=0)
    window, bias = (3, 5, 5), 0.7
    scores = validate_candidates(
        method,
        forest,
        data,
        mode=mode,
        device=torch.device("cpu"),
        background_bias=bias,
        vote_window=window,
    )
    for name in ("network+bias+vote", "forest+vote", "ensemble+bias", "ensemble"):
        source = name.split("+")[0]
        writer = project.begin_round()
        for _ in predict_into_round(
            project,
            method,
            writer,
            norm=data.norm,
            mode=mode,
            device=torch.device("cpu"),
            background_bias=bias if "bias" in name else 0.0,
            vote_window=window if "vote" in name else (1, 1, 1),
            smoothing=data.smoothing,
            source=source,
            forest=forest,
        ):
            pass
        written = np.asarray(writer.pseudo[...])
        writer.abort()
        counts = sum(
            class_counts(written[i][held], truth[held], 2)
            for i, (truth, held) in data.held_out.items()
        )
        assert scores[name] == dice_scores(counts), name
