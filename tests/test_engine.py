"""The training engine on tiny real projects: rounds, corrections, stop, determinism."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from napari_ssl_seg.config import TrainConfig
from napari_ssl_seg.engine import load_checkpoint, load_method, run_round, train_round
from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.methods import method_names
from napari_ssl_seg.store import Project


def test_round_bookkeeping(tiny_project, tiny_config):
    project, image, labels = tiny_project
    reports = []
    record = run_round(project, tiny_config(), progress=reports.append)
    assert record["round"] == 1 and project.latest_round == 1
    assert {r["phase"] for r in reports} >= {"load", "train", "predict", "done"}
    train = [r for r in reports if r["phase"] == "train"]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert all("loss" in r["losses"] and r["remaining"] >= 0 for r in train)
    for key in (
        "method",
        "config",
        "seed",
        "started",
        "finished",
        "metrics",
        "checkpoint_sha256",
        "revision",
        "uncertain_slices",
        "human_slices",
    ):
        assert key in record
    assert record["human_slices"] == [1, 4]
    ranked = [s["slice"] for s in record["uncertain_slices"]]
    assert ranked and not set(ranked) & {1, 4}  # fully human slices are never proposed
    pseudo = project.pseudo_labels(1)[...]
    conf = project.confidence(1)[...]
    assert pseudo.shape == image.shape and pseudo.dtype == np.uint16
    assert conf.dtype == np.float32 and 0.0 <= conf.min() and conf.max() <= 1.0
    ckpt = load_checkpoint(project.checkpoint_path(1))  # weights_only: no code runs on load
    assert ckpt["method"] == "supervised" and ckpt["revision"] == project.revision
    # what prediction did besides the network, so the round can be re-made from disk:
    # slices 4x as thick as the pixels are wide -> smoothing and vote 4x shorter across
    # (the vote applied only where validation kept it)
    voted = [1, 5, 5] if record["chosen"]["vote"] else [1, 1, 1]
    for saved in (record, ckpt):
        assert saved["smoothing_sigmas"] == pytest.approx([0.25, 1.0])
        assert saved["vote_window"] == voted
        assert len(saved["norm"]) == 2 and "background_bias" in saved
    method, _ = load_method(project, 1)
    assert isinstance(method, torch.nn.Module)
    # the export source shows human labels on annotated slices
    np.testing.assert_array_equal(project.final[1], labels[1])


def test_corrections_survive_retraining(tiny_project, tiny_config):
    project, _, labels = tiny_project
    run_round(project, tiny_config())
    fix = np.zeros_like(labels)
    fix[6, 2:9, 2:9] = 1  # a human says: there is an object here
    project.correct_slices(fix, [6], source="test")
    corrections = project.corrections[...].copy()
    corrected = project.corrected[...].copy()
    annotations = project.annotations[...].copy()
    record = run_round(project, tiny_config(seed=1, init="previous"))
    assert record["round"] == 2 and record["initialised_from"] == "round 1"
    assert record["pseudo_labels_from_round"] == 1
    np.testing.assert_array_equal(project.corrections[...], corrections)
    np.testing.assert_array_equal(project.corrected[...], corrected)
    np.testing.assert_array_equal(project.annotations[...], annotations)
    np.testing.assert_array_equal(project.merged_labels()[6], fix[6])
    np.testing.assert_array_equal(project.final[6], fix[6])
    assert 6 not in [s["slice"] for s in record["uncertain_slices"]]


def test_previous_weights_that_do_not_fit_start_from_scratch(tiny_project, tiny_config):
    project, _, _ = tiny_project
    run_round(project, tiny_config())
    two = tiny_config(init="previous", settings={"networks": 2})  # a two-network ensemble
    record = run_round(project, two)
    assert record["initialised_from"] == "scratch (round 1's networks differ)"
    assert run_round(project, two)["initialised_from"] == "round 2"


def test_stop_keeps_weights_and_commits(tiny_project, tiny_config):
    project, _, _ = tiny_project
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    record = run_round(project, tiny_config(iterations=50), should_stop=stop)
    assert record["stopped_early"] and record["iterations_done"] == 2
    assert project.latest_round == 1


def test_deterministic_with_seed(tmp_path, tiny_config):
    from conftest import disks_volume

    image, labels = disks_volume()
    outputs = []
    for name in ("a", "b"):
        project = Project.create(tmp_path / f"{name}.zarr", image)
        project.annotate_slices(labels, [1, 4])
        losses = [
            r["losses"]["loss"]
            for r in train_round_reports(project, tiny_config(method="mean-teacher"))
        ]
        outputs.append((losses, project.confidence(1)[...]))
    assert outputs[0][0] == outputs[1][0]
    np.testing.assert_array_equal(outputs[0][1], outputs[1][1])


def train_round_reports(project, config):
    return [r for r in _drain(train_round(project, config)) if r["phase"] == "train"]


def _drain(gen):
    while True:
        try:
            yield next(gen)
        except StopIteration:
            return


def test_no_annotation_is_a_clear_error(tmp_path, tiny_config):
    from conftest import disks_volume

    image, _ = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image)
    with pytest.raises(InvalidInputError, match="no slice is annotated"):
        run_round(project, tiny_config())
    assert project.latest_round == 0


def test_annotated_empty_slice_teaches_background(tmp_path, tiny_config):
    from conftest import disks_volume

    image, labels = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [0, 4])  # slice 0 is empty: annotated background
    record = run_round(project, tiny_config())
    assert record["human_slices"] == [0, 4]


def test_pseudo_labels_are_balanced_per_class_and_skip_human_voxels():
    from napari_ssl_seg.data import confident_pseudo_labels

    rng = np.random.default_rng(0)
    pseudo = np.zeros((2, 20, 20), np.uint16)
    pseudo[:, 5:15, 5:15] = 1  # the minority class
    # Sure of the background (0.95-1.0), unsure of the object (0.55-0.85).
    confidence = np.where(pseudo == 1, rng.uniform(0.55, 0.85, pseudo.shape), 0.0)
    confidence = np.where(pseudo == 0, rng.uniform(0.95, 1.0, pseudo.shape), confidence)
    free = np.ones(pseudo.shape, bool)
    free[0] = False  # slice 0 is human-labelled
    plain = confident_pseudo_labels(pseudo, confidence, free, 0.9, 0.0)
    assert not plain[pseudo == 1].any() and plain[1][pseudo[1] == 0].all()
    balanced = confident_pseudo_labels(pseudo, confidence, free, 0.9, 0.5)
    assert not balanced[0].any()  # never on a human voxel
    kept = balanced[1][pseudo[1] == 1]
    assert abs(kept.mean() - 0.5) < 0.02  # the object's most confident half
    high = confidence[1][pseudo[1] == 1] >= np.median(confidence[1][pseudo[1] == 1])
    np.testing.assert_array_equal(kept, high)
    assert balanced[1][pseudo[1] == 0].all()  # the threshold still admits all background


def test_retrain_round_learns_from_both_classes(tiny_project, tiny_config):
    from napari_ssl_seg.data import load_training_set

    project, _, _ = tiny_project
    run_round(project, tiny_config(iterations=20))
    pseudo = np.asarray(project.pseudo_labels(1)[...])
    confidence = np.asarray(project.confidence(1)[...])
    _, human = project.human_labels()
    used = {}
    for share in (0.0, 0.5):
        data = load_training_set(project, tiny_config(pseudo_class_share=share))
        weight, target = np.asarray(data.weight), np.asarray(data.target)
        used[share] = (weight == 0.5) & ~human
        assert (weight[human] == 1).all()
        np.testing.assert_array_equal(target[used[share]], pseudo[used[share]])
    np.testing.assert_array_equal(used[0.0], (confidence >= 0.9) & ~human)
    object_voxels = ((pseudo == 1) & ~human).sum()
    assert (pseudo[used[0.5]] == 1).sum() >= 0.45 * object_voxels


@pytest.mark.parametrize("name", [m for m in method_names()])
def test_every_method_writes_a_round(tiny_project, tiny_config, name):
    project, _, _ = tiny_project
    settings = {"pretrain_iterations": 2} if name == "diffusion" else {}
    record = run_round(project, tiny_config(method=name, iterations=2, settings=settings))
    assert record["method"] == name and project.latest_round == 1
    assert project.pseudo_labels(1).shape == project.shape
    if name == "diffusion":
        assert list((project.path / "ssl_seg" / "pretrained").glob("diffusion-*.pt"))


@pytest.mark.parametrize("mode", ["2.5d", "3d"])
def test_other_modes(tiny_project, tiny_config, mode):
    project, _, _ = tiny_project
    record = run_round(project, tiny_config(mode=mode, iterations=2))
    assert record["config"]["mode"] == mode and project.latest_round == 1


def test_3d_round_on_a_volume_larger_than_one_slab(tiny_project, tiny_config, monkeypatch):
    """The block-by-block 3D prediction feeds the vote and the round's arrays whole."""
    from napari_ssl_seg import inference

    project, _, _ = tiny_project
    # Reads of (2 + 2 * 2) x 20 x 20 voxels: blocks 2 slices deep, 2 x 2 in-plane.
    monkeypatch.setattr(inference, "VOXELS_PER_3D_BLOCK", 6 * 20 * 20)
    monkeypatch.setattr(inference, "HALO_3D", 2)
    monkeypatch.setattr(inference, "TILE_3D", 16)
    record = run_round(project, tiny_config(mode="3d", iterations=2))
    confidence = np.asarray(project.confidence(1)[...])
    assert record["config"]["mode"] == "3d" and confidence.shape == project.shape
    assert (confidence >= 0.5).all()  # every voxel predicted (2 classes: max prob >= 0.5)
    assert len(record["uncertain_slices"]) > 0


def test_auto_picks_mean_teacher_from_one_slice_and_supervised_from_two(tmp_path, tiny_config):
    from conftest import disks_volume

    image, labels = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [4], source="test")
    reports = list(_drain(train_round(project, tiny_config(method="auto", iterations=6))))
    record = project.round_record(1)
    assert record["method"] == "mean-teacher" and record["iterations_done"] == 6
    choices = [r["choice"] for r in reports if r.get("choice")]
    assert choices == [record["method_choice"]]
    assert record["method_choice"] == "auto (1 annotated slice: mean-teacher)"

    # A correction makes it two human slices: supervised, every iteration asked for.
    project.correct_slices(labels, [6], source="test")
    record = run_round(project, tiny_config(method="auto", iterations=6))
    assert record["method"] == "supervised" and record["iterations_done"] == 6
    assert record["human_slices"] == [4, 6]
    assert record["method_choice"] == "auto (2 annotated slices: supervised)"


def test_resolve_method_rules():
    from napari_ssl_seg.config import resolve_method

    named = TrainConfig(method="cps")
    assert resolve_method(named, 1) == (named, "")
    assert resolve_method(TrainConfig(mode="2.5d"), 1)[0].method == "supervised"  # measured in 2D
    chosen, _ = resolve_method(TrainConfig(iterations=7), 1)
    assert chosen.method == "mean-teacher" and chosen.iterations == 7
    assert resolve_method(TrainConfig(), 2)[0].method == "supervised"
    with pytest.raises(InvalidInputError, match="settings must be empty with method 'auto'"):
        TrainConfig(settings={"pretrain_iterations": 0})


# ------------------------------------------------------------------------- trust
def test_a_round_checkpoint_is_checked_against_its_record(tiny_project, tiny_config):
    from napari_ssl_seg.errors import ProjectError

    project, _, _ = tiny_project
    run_round(project, tiny_config())
    path = project.checkpoint_path(1)
    good = path.read_bytes()
    altered = bytearray(good)
    altered[len(altered) // 2] ^= 0xFF  # same length, one byte changed
    path.write_bytes(bytes(altered))
    with pytest.raises(ProjectError, match="does not match the sha256 recorded for round 1"):
        load_method(project, 1)
    # a round that starts from the previous weights refuses them too, before training
    with pytest.raises(ProjectError, match=str(path)):
        run_round(project, tiny_config(init="previous"))
    assert project.latest_round == 1
    path.write_bytes(good)
    load_method(project, 1)


def test_a_truncated_checkpoint_is_one_line(tiny_project, tiny_config, tmp_path, capsys):
    from napari_ssl_seg.cli import main
    from napari_ssl_seg.errors import ProjectError

    project, _, _ = tiny_project
    run_round(project, tiny_config())
    path = project.checkpoint_path(1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ProjectError, match=f"{path} does not match the sha256"):
        load_method(project, 1)
    copy = tmp_path / "copy.pt"  # without a record to check against
    copy.write_bytes(data[: len(data) // 3])
    with pytest.raises(ProjectError, match=f"{copy}: not a loadable checkpoint"):
        load_checkpoint(copy)
    argv = ["train", str(project.path), "--set", "init=previous", "--iterations", "1"]
    assert main([*argv, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_a_damaged_pretraining_cache_is_replaced(tiny_project, tiny_config):
    project, _, _ = tiny_project
    config = tiny_config(method="diffusion", iterations=1, settings={"pretrain_iterations": 2})
    run_round(project, config)
    (cache,) = (project.path / "ssl_seg" / "pretrained").glob("diffusion-*.pt")
    digest = cache.with_name(cache.name + ".sha256")
    assert digest.read_text() == hashlib.sha256(cache.read_bytes()).hexdigest()
    reports = []
    run_round(project, config, progress=reports.append)  # reused: no pretraining steps
    assert not [r for r in reports if r["phase"] == "pretrain"]
    data = cache.read_bytes()
    cache.write_bytes(data[: len(data) // 2])
    reports = []
    run_round(project, config, progress=reports.append)
    notes = [r["note"] for r in reports if r.get("note")]
    assert len(notes) == 1 and "ignoring the cached pretraining weights" in notes[0]
    steps = [r["iteration"] for r in reports if r["phase"] == "pretrain" and "note" not in r]
    assert steps == [1, 2]  # pretrained again
    assert digest.read_text() == hashlib.sha256(cache.read_bytes()).hexdigest()


def test_training_on_a_damaged_chunk_is_one_line(tiny_project, tiny_config):
    from napari_ssl_seg.errors import ProjectError

    project, _, _ = tiny_project
    chunk = project.path / "ssl_seg" / "annotated" / "c" / "4" / "0" / "0"
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(ProjectError, match="array ssl_seg/annotated is damaged"):
        run_round(project, tiny_config())
    assert project.rounds() == []
