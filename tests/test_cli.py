"""The CLI contract, in-process: each subcommand on real files, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_ssl_seg.cli import main
from napari_ssl_seg.store import Project

TINY = [
    "--iterations",
    "2",
    "--threads",
    "1",
    "--set",
    "features=8,16,16,32,32,8",
    "--set",
    "patch_size=32",
    "--set",
    "labelled_batch=1",
    "--set",
    "unlabelled_batch=1",
    "--method",
    "supervised",
    "--quiet",
]


@pytest.fixture
def files(tmp_path):
    from conftest import disks_volume

    image, labels = disks_volume()
    sparse = np.zeros_like(labels)
    sparse[[1, 4]] = labels[[1, 4]]
    paths = {
        "image": tmp_path / "img.tif",
        "labels": tmp_path / "lab.tif",
        "truth": tmp_path / "truth.tif",
    }
    tifffile.imwrite(paths["image"], image)
    tifffile.imwrite(paths["labels"], sparse)
    tifffile.imwrite(paths["truth"], labels)
    return tmp_path, paths


def test_full_loop(files, capsys):
    tmp, f = files
    proj = tmp / "p.zarr"
    assert (
        main(
            [
                "init",
                str(proj),
                "--image",
                str(f["image"]),
                "--labels",
                str(f["labels"]),
                "--annotated-slices",
                "0,1,4",
            ]
        )
        == 0
    )
    assert Project.open(proj).annotated_slices() == [0, 1, 4]  # 0 is an empty annotated slice
    assert main(["train", str(proj), *TINY]) == 0
    out = capsys.readouterr().out
    assert "round 1 (supervised, 2 iterations" in out and "pseudo_r001" in out  # auto, 3 slices
    # the validation estimate and what the round wrote, from the round record
    record = Project.open(proj).round_record(1)
    share = 100 * record["validation"]["held_out_fraction"]
    assert f"  validation: {share:.1f}% of the human voxels held out; Dice network " in out
    assert f"  wrote {record['chosen']['candidate']}: best held-out Dice " in out
    assert main(["correct", str(proj), "--labels", str(f["truth"]), "--slices", "5,6"]) == 0
    assert Project.open(proj).corrected_slices() == [5, 6]
    assert main(["train", str(proj), *TINY]) == 0
    for ext in ("tif", "nii.gz", "zarr"):
        assert main(["export", str(proj), "--out", str(tmp / f"out.{ext}")]) == 0
    assert main(["export", str(proj), "--out", str(tmp / "r1.tif"), "--round", "1"]) == 0
    exported = tifffile.imread(tmp / "out.tif")
    np.testing.assert_array_equal(exported[[5, 6]], tifffile.imread(f["truth"])[[5, 6]])
    capsys.readouterr()
    assert (
        main(
            [
                "evaluate",
                str(tmp / "out.tif"),
                str(f["truth"]),
                "--exclude-slices",
                "0,1,4",
                "--json",
            ]
        )
        == 0
    )
    scores = json.loads(capsys.readouterr().out)
    assert set(scores["class 1"]) == {"dice", "iou", "hd95", "asd"}


def test_init_counts_labelled_slices(files):
    tmp, f = files
    assert (
        main(
            ["init", str(tmp / "p.zarr"), "--image", str(f["image"]), "--labels", str(f["labels"])]
        )
        == 0
    )
    assert Project.open(tmp / "p.zarr").annotated_slices() == [4]  # slice 1 is empty in the disks


def test_methods_lists_all(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in (
        "auto (default)",
        "supervised",
        "mean-teacher",
        "ua-mt",
        "cps",
        "dtc",
        "dtml",
        "simcvd",
        "diffusion",
    ):
        assert f"{name}" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["init", "{tmp}/q.zarr", "--image", "{tmp}/missing.tif"], "missing.tif"),
        (
            [
                "init",
                "{tmp}/q.zarr",
                "--image",
                "{image}",
                "--labels",
                "{labels}",
                "--annotated-slices",
                "1,x",
            ],
            "not a slice index",
        ),
        (
            [
                "init",
                "{tmp}/q.zarr",
                "--image",
                "{image}",
                "--labels",
                "{labels}",
                "--annotated-slices",
                "99",
            ],
            "outside",
        ),
        (
            ["init", "{tmp}/q.zarr", "--image", "{image}", "--annotated-slices", "1"],
            "needs --labels",
        ),
        (["init", "{proj}", "--image", "{image}"], "already exists"),
        (["train", "{tmp}/nothing.zarr"], "no such project"),
        (["train", "{proj}", "--method", "dtcc"], "Did you mean 'dtc'"),
        (["train", "{proj}", "--set", "bogus=1"], "unknown TrainConfig key"),
        (["train", "{proj}", "--set", "iterations"], "KEY=VALUE"),
        (["train", "{proj}", "--set", "smoothing=-1"], "smoothing must be a number >= 0"),
        (["train", "{proj}", "--set", "smoothing=nan"], "smoothing must be a number >= 0"),
        (["train", "{proj}", "--set", "output=trees"], "output must be one of"),
        (
            ["train", "{proj}", "--set", "validation_fraction=0.7"],
            "validation_fraction must be in [0, 0.5], got 0.7",
        ),
        (["train", "{proj}", "--mode", "3d", "--set", "output=forest"], "in 3d mode"),
        (["train", "{proj}", "--method", "dtc", "--setting", "bogus=1"], "unknown setting"),
        (["correct", "{proj}", "--labels", "{labels}", "--slices", "2"], "no round to correct"),
        (["export", "{proj}", "--out", "{tmp}/x.png"], "png"),
        (["export", "{proj}", "--out", "{tmp}/x.tif", "--round", "3"], "no round 3"),
        (["evaluate", "{image}", "{tmp}/missing.tif"], "missing.tif"),
        (["evaluate", "{image}", "{labels}", "--axis", "5"], "--axis must be 0, 1 or 2, got 5"),
        (["train", "{proj}", "--set", "iterations=abc"], "must be an integer, got 'abc'"),
        (["train", "{proj}", "--set", "iterations=1.5"], "iterations must be an integer, got 1.5"),
        (["train", "{proj}", "--set", "features=8"], "features must be 6 integers >= 1, got 8"),
        (["train", "{proj}", "--set", "device=foo"], "device must be 'auto', 'cpu'"),
        (["train", "{proj}", "--set", "patch_size=1e9"], "GiB of memory"),
        (["train", "{proj}", "--set", "labelled_batch=100000"], "GiB of memory"),
    ],
)
def test_bad_input(files, capsys, argv, message):
    tmp, f = files
    proj = tmp / "p.zarr"
    Project.create(proj, tifffile.imread(f["image"]))
    subst = {"tmp": tmp, "image": f["image"], "labels": f["labels"], "proj": proj}
    code = main([a.format(**subst) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert Project.open(proj).latest_round == 0  # nothing half-written


def test_evaluate_shape_mismatch(files, capsys):
    tmp, f = files
    tifffile.imwrite(tmp / "small.tif", np.zeros((5, 6, 7), np.uint8))
    assert main(["evaluate", str(tmp / "small.tif"), str(f["truth"])]) == 2
    assert "does not match" in capsys.readouterr().err


# ------------------------------------------------------- commands that never destroy
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def _siblings(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_init_overwrite_with_bad_labels_keeps_the_old_project(files, capsys):
    tmp, f = files
    proj = tmp / "p.zarr"
    assert main(["init", str(proj), "--image", str(f["image"]), "--labels", str(f["labels"])]) == 0
    before = Project.open(proj).edits()
    tifffile.imwrite(tmp / "small.tif", np.ones((2, 5, 6), np.uint8))
    names = _siblings(tmp)
    capsys.readouterr()
    argv = ["init", str(proj), "--image", str(f["image"]), "--overwrite"]
    assert main([*argv, "--labels", str(tmp / "small.tif")]) == 2
    assert "does not match the image shape" in _one_line_error(capsys)
    assert Project.open(proj).edits() == before
    assert _siblings(tmp) == names  # no half-built project beside it


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", "{tmp}/missing.tif"], "missing.tif"),
        (["--labels", "{tmp}/small.tif"], "does not match the image shape"),
        (["--labels", "{labels}", "--annotated-slices", "0,99"], "outside"),
        (["--annotated-slices", "1"], "needs --labels"),
        (["--axis", "5"], "axis must be 0, 1 or 2, got 5"),
    ],
)
def test_failed_init_leaves_nothing_behind(files, capsys, extra, message):
    tmp, f = files
    tifffile.imwrite(tmp / "small.tif", np.ones((2, 5, 6), np.uint8))
    names = _siblings(tmp)
    argv = ["init", str(tmp / "q.zarr"), "--image", str(f["image"])]
    subst = {"tmp": tmp, "labels": f["labels"]}
    assert main(argv + [a.format(**subst) for a in extra]) == 2
    assert message in _one_line_error(capsys)
    assert _siblings(tmp) == names
    assert main(argv) == 0  # the rerun does not find a half project "already there"


def test_init_over_an_existing_project_names_the_cli_flag(files, capsys):
    tmp, f = files
    proj = tmp / "p.zarr"
    argv = ["init", str(proj), "--image", str(f["image"])]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "p.zarr already exists; pass --overwrite to replace it" in err
    assert "overwrite=True" not in err
    assert main([*argv, "--overwrite"]) == 0


@pytest.mark.parametrize("kind", ["folder", "file", "zarr"])
def test_init_overwrite_replaces_only_a_project(files, capsys, kind):
    import zarr

    tmp, f = files
    target = tmp / "precious"
    if kind == "folder":
        target.mkdir()
        (target / "thesis.txt").write_text("years of work")
    elif kind == "file":
        target.write_text("years of work")
    else:
        zarr.open_group(target, mode="w").attrs["mine"] = 1
    assert main(["init", str(target), "--image", str(f["image"]), "--overwrite"]) == 2
    err = _one_line_error(capsys)
    assert f"{target} is not a napari-ssl-seg project; refusing to replace it" in err
    if kind == "folder":
        assert (target / "thesis.txt").read_text() == "years of work"
    elif kind == "file":
        assert target.read_text() == "years of work"
    else:
        assert zarr.open_group(target, mode="r").attrs["mine"] == 1
    assert not any(p.name.startswith(".precious") for p in tmp.iterdir())


@pytest.fixture
def exported(files):
    """A project made from the image file, and an existing file at out.tif."""
    tmp, f = files
    proj = tmp / "p.zarr"
    assert main(["init", str(proj), "--image", str(f["image"]), "--labels", str(f["labels"])]) == 0
    (tmp / "out.tif").write_bytes(b"an older export")
    return proj, tmp / "out.tif", f


def test_export_refuses_an_existing_file_unless_overwrite(exported, capsys):
    proj, out, _ = exported
    capsys.readouterr()
    assert main(["export", str(proj), "--out", str(out)]) == 2
    assert "out.tif already exists; pass --overwrite to replace it" in _one_line_error(capsys)
    assert out.read_bytes() == b"an older export"
    assert main(["export", str(proj), "--out", str(out), "--overwrite"]) == 0
    np.testing.assert_array_equal(tifffile.imread(out), Project.open(proj).merged_labels())


def test_export_always_refuses_the_source_image_and_the_project(exported, capsys, monkeypatch):
    proj, out, f = exported
    original = f["image"].read_bytes()
    monkeypatch.chdir(out.parent)  # the source as a relative path names the same file
    for target in (f["image"], "img.tif", proj / "labels.tif", proj / "ssl_seg" / "x.tif"):
        capsys.readouterr()
        assert main(["export", str(proj), "--out", str(target), "--overwrite"]) == 2
        err = _one_line_error(capsys)
        assert "refusing to write there" in err, err
    assert f["image"].read_bytes() == original
    assert not (proj / "labels.tif").exists()


def test_demo_never_overwrites_an_explicit_path(files, capsys):
    tmp, f = files
    proj = tmp / "mine.zarr"
    assert main(["init", str(proj), "--image", str(f["image"]), "--labels", str(f["labels"])]) == 0
    edits = Project.open(proj).edits()
    (tmp / "mine.tif").write_bytes(b"keep me")
    cases = [
        (["--project", str(proj)], "mine.zarr already exists; pass --overwrite"),
        (["--project", str(tmp / "new.zarr"), "--out", str(tmp / "mine.tif")], "mine.tif"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["demo", "--headless", "--iterations", "1", *extra]) == 2
        assert message in _one_line_error(capsys)  # refused before any training
    assert Project.open(proj).edits() == edits
    assert (tmp / "mine.tif").read_bytes() == b"keep me"
    assert not (tmp / "new.zarr").exists()
    (tmp / "folder").mkdir()
    (tmp / "folder" / "notes.txt").write_text("mine")
    argv = ["demo", "--headless", "--project", str(tmp / "folder"), "--overwrite"]
    assert main(argv) == 2
    assert "not a napari-ssl-seg project" in _one_line_error(capsys)
    assert (tmp / "folder" / "notes.txt").read_text() == "mine"


def test_demo_default_paths_are_numbered_when_taken(tmp_path, monkeypatch):
    from napari_ssl_seg.cli import demo_paths

    monkeypatch.chdir(tmp_path)
    first = demo_paths(None, None)
    assert first == (Path("napari-ssl-seg-demo.zarr"), Path("napari-ssl-seg-demo-labels.tif"))
    first[1].write_bytes(b"a previous run")  # either name taken moves both on
    second = demo_paths(None, None)
    assert second == (Path("napari-ssl-seg-demo-2.zarr"), Path("napari-ssl-seg-demo-2-labels.tif"))
    second[0].mkdir()
    assert demo_paths(None, None)[0] == Path("napari-ssl-seg-demo-3.zarr")
    mine = tmp_path / "mine.zarr"
    assert demo_paths(mine, None) == (mine, Path("napari-ssl-seg-demo-2-labels.tif"))


# ------------------------------------------------------------------- label sanity
def test_init_and_correct_refuse_labels_that_are_not_classes(files, capsys):
    tmp, f = files
    image = tifffile.imread(f["image"])
    instances = np.zeros(image.shape, np.uint16)
    instances[4].flat[:400] = np.arange(1, 401)  # 400 objects, each its own value
    tifffile.imwrite(tmp / "instances.tif", instances)
    proj = tmp / "p.zarr"
    argv = ["init", str(proj), "--image", str(f["image"]), "--labels", str(tmp / "instances.tif")]
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert "looks like an instance image or an intensity image: 401 distinct values" in err
    assert "max label 400" in err and "--max-classes" in err
    assert not proj.exists()
    assert main([*argv, "--max-classes", "400"]) == 0
    assert Project.open(proj).annotated_slices() == [4]
    assert main(["train", str(proj), *TINY]) == 0
    capsys.readouterr()
    argv = ["correct", str(proj), "--labels", str(tmp / "instances.tif"), "--slices", "4"]
    assert main(argv) == 2
    assert "max label 400" in _one_line_error(capsys)
    assert Project.open(proj).corrected_slices() == []
    assert main([*argv, "--max-classes", "1000"]) == 0
    assert Project.open(proj).corrected_slices() == [4]


def test_cli_correct_follows_the_edit_rule(files, capsys):
    """The latest human act wins from the CLI too: a correction of an annotated slice
    beats the annotation, and a later annotation (API, the widget's path) beats it."""
    tmp, f = files
    proj = tmp / "p.zarr"
    argv = ["init", str(proj), "--image", str(f["image"]), "--labels", str(f["labels"])]
    assert main([*argv, "--annotated-slices", "1,4"]) == 0
    assert main(["train", str(proj), *TINY]) == 0
    fix = np.zeros(tifffile.imread(f["truth"]).shape, np.uint16)
    fix[4, :8, :8] = 2  # the annotator now says slice 4 holds class 2 here, else nothing
    tifffile.imwrite(tmp / "fix.tif", fix)
    assert main(["correct", str(proj), "--labels", str(tmp / "fix.tif"), "--slices", "4"]) == 0
    project = Project.open(proj)
    np.testing.assert_array_equal(project.merged_labels()[4], fix[4])
    box = (slice(4, 5), slice(0, 2), slice(0, 2))
    project.apply_edit("annotation", box, np.ones((1, 2, 2), np.uint16), whole_slices=True)
    assert main(["export", str(proj), "--out", str(tmp / "out.tif")]) == 0
    written = tifffile.imread(tmp / "out.tif")
    assert (written[box] == 1).all() and (written[4, 2:8, 2:8] == 2).all()
