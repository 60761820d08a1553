"""The CLI contract, in-process: each subcommand on real files, and bad input."""

from __future__ import annotations

import json

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
        (["train", "{proj}", "--method", "dtc", "--setting", "bogus=1"], "unknown setting"),
        (["correct", "{proj}", "--labels", "{labels}", "--slices", "2"], "no round to correct"),
        (["export", "{proj}", "--out", "{tmp}/x.png"], "png"),
        (["export", "{proj}", "--out", "{tmp}/x.tif", "--round", "3"], "no round 3"),
        (["evaluate", "{image}", "{tmp}/missing.tif"], "missing.tif"),
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
