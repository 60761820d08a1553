"""Tests of the Zarr project store on small real stores in ``tmp_path``.

The crash tests kill real child processes with SIGKILL while they write. To make the
partial state certain rather than a race, one variant slows the child's chunk writes
(a patch inside the child only); the library code runs unchanged.
"""

import dataclasses
import hashlib
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from napari_ssl_seg.errors import (
    InvalidInputError,
    PathExistsError,
    ProjectError,
    SignatureMismatchError,
)
from napari_ssl_seg.labels import LABEL_DTYPE
from napari_ssl_seg.store import SCHEMA_VERSION, Project, chunk_shape, image_signature

SHAPE = (6, 32, 32)
VOXEL = (2.0, 0.5, 0.25)
HUMAN = ("annotations", "corrections", "annotated", "corrected")
ARRAYS = ("image", "final", *HUMAN)


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 1000, SHAPE).astype(np.uint16)


@pytest.fixture
def labels():
    """Labels of a whole volume: a square of class 1 on slice 2, class 2 on slice 4."""
    out = np.zeros(SHAPE, np.uint16)
    out[2, 4:12, 4:12] = 1
    out[4, 20:30, 0:8] = 2
    return out


@pytest.fixture
def project(tmp_path, image):
    return Project.create(tmp_path / "p.zarr", image, voxel_size=VOXEL, source="vol.tif")


def arrays(project, names=ARRAYS):
    return {n: np.asarray(getattr(project, n)[...]) for n in names}


def state(path):
    """Everything a failing call must leave alone: arrays, logs, rounds, file names."""
    p = Project.open(path, recover=False, verify=False)
    files = sorted(str(f.relative_to(path)) for f in Path(path).rglob("*"))
    edits = [dataclasses.astuple(e) for e in p.edits()]
    return arrays(p), edits, p.rounds(), files


def assert_same_state(a, b):
    assert a[0].keys() == b[0].keys()
    for name in a[0]:
        np.testing.assert_array_equal(a[0][name], b[0][name], err_msg=name)
    assert a[1:] == b[1:]


def commit_round(project, value=5, *, confidence=0.5, checkpoint=b"weights"):
    writer = project.begin_round()
    for index in ((slice(0, 3),), (slice(3, None),)):
        block = np.full(project.image[index].shape, value, np.uint16)
        writer.write(index, block, np.full(block.shape, confidence, np.float32))
    return writer.commit({"method": "mean_teacher", "revision": project.revision}, checkpoint)


# ----------------------------------------------------------------- create / open
def test_create_reopen_round_trip(project, image):
    path = project.path
    again = Project.open(path, image=image)
    np.testing.assert_array_equal(again.image[...], image)
    assert again.image.dtype == image.dtype
    assert again.image.chunks == chunk_shape(SHAPE, 0) == (1, 32, 32)
    assert (again.shape, again.n_slices, again.axis) == (SHAPE, 6, 0)
    assert again.voxel_size == VOXEL
    assert (again.units, again.source) == ("micrometer", "vol.tif")
    assert again.signature == project.signature == image_signature(image)
    assert (again.revision, again.edits(), again.latest_round, again.rounds()) == (0, [], 0, [])
    for name in HUMAN + ("final",):
        arr = getattr(again, name)
        assert arr.shape == SHAPE
        assert not np.asarray(arr[...]).any(), name
    assert again.annotated_slices() == again.corrected_slices() == []
    assert [p.name for p in path.parent.iterdir()] == ["p.zarr"]  # no temporary left


def test_big_endian_image_round_trips(tmp_path, image):
    # TIFF and FITS files can be big-endian; zarr hands back native arrays.
    big = image.astype(">u2")
    project = Project.create(tmp_path / "b.zarr", big)
    again = Project.open(project.path, image=big, verify=True)
    np.testing.assert_array_equal(again.image[...], image)
    assert again.signature == image_signature(image) == image_signature(big)


def test_ome_zarr_metadata(project):
    root = zarr.open_group(project.path, mode="r")  # a plain Zarr reader opens it
    ome = root.attrs["ome"]
    assert ome["version"] == "0.5"
    (ms,) = ome["multiscales"]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"]
    assert {a["unit"] for a in ms["axes"]} == {"micrometer"}
    (dataset,) = ms["datasets"]
    assert dataset["path"] == "0"
    assert dataset["coordinateTransformations"] == [{"type": "scale", "scale": list(VOXEL)}]
    assert root["0"].shape == SHAPE
    assert root.attrs["napari_ssl_seg"]["schema_version"] == SCHEMA_VERSION
    label_group = root["labels"]
    assert label_group.attrs["ome"] == {
        "version": "0.5",
        "labels": ["annotations", "corrections", "final"],
    }
    for name in label_group.attrs["ome"]["labels"]:
        group = label_group[name]
        assert group.attrs["ome"]["image-label"]["source"] == {"image": "../../"}
        assert group.attrs["ome"]["multiscales"][0]["datasets"][0]["path"] == "0"
        assert group["0"].shape == SHAPE and group["0"].dtype == LABEL_DTYPE


def test_round_label_image_is_listed_once_committed(project):
    commit_round(project)
    root = zarr.open_group(project.path, mode="r")
    assert root["labels"].attrs["ome"]["labels"][-1] == "pseudo_r001"
    assert "image-label" in root["labels/pseudo_r001"].attrs["ome"]


def test_default_voxel_size_is_unit_scale(tmp_path, image):
    project = Project.create(tmp_path / "p.zarr", image)
    assert project.voxel_size is None
    ome = zarr.open_group(project.path, mode="r").attrs["ome"]
    assert ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] == [
        1,
        1,
        1,
    ]


def test_create_overwrite_replaces_the_project(project, labels):
    project.annotate_slices(labels, [2])
    new_image = np.ones((3, 8, 8), np.uint8)
    again = Project.create(project.path, new_image, overwrite=True)
    assert again.shape == (3, 8, 8)
    assert (again.revision, again.annotated_slices()) == (0, [])
    assert sorted(p.name for p in project.path.parent.iterdir()) == ["p.zarr"]


# ----------------------------------------------------------------- annotations
def test_annotate_slices_marks_whole_slices_even_when_empty(project, labels):
    edits = project.annotate_slices(labels, [1, 2], source="widget")
    ann, annotated = project.annotations[...], project.annotated[...]
    assert annotated[1].all() and annotated[2].all()  # slice 1 is annotated background
    assert not annotated[[0, 3, 4, 5]].any()
    np.testing.assert_array_equal(ann[2], labels[2])
    assert not ann[1].any()
    assert project.annotated_slices() == [1, 2]
    human, known = project.human_labels()
    np.testing.assert_array_equal(known, annotated > 0)
    np.testing.assert_array_equal(human[2], labels[2])
    np.testing.assert_array_equal(project.final[...], np.where(known, labels, 0))
    # the same voxels as unknown and as annotated background differ only in the mask
    assert (human[0] == human[1]).all() and not known[0].any() and known[1].all()
    assert [(e.id, e.kind, e.whole_slices, e.source) for e in edits] == [
        (1, "annotation", True, "widget"),
        (2, "annotation", True, "widget"),
    ]
    assert edits[0].region == (slice(1, 2), slice(0, 32), slice(0, 32))
    assert edits[0].n_voxels == 32 * 32
    assert project.revision == 2 and project.edits() == edits


def test_partial_annotation_marks_only_the_masked_voxels(project):
    region = (slice(1, 4), slice(10, 20), slice(5, 9))
    rng = np.random.default_rng(1)
    values = rng.integers(0, 3, (3, 10, 4)).astype(np.uint8)
    mask = rng.random((3, 10, 4)) < 0.5
    edit = project.apply_edit("annotation", region, values, mask, whole_slices=False)
    expected_mask = np.zeros(SHAPE, bool)
    expected_mask[region] = mask
    np.testing.assert_array_equal(project.annotated[...] > 0, expected_mask)
    expected = np.zeros(SHAPE, np.uint16)
    expected[region] = np.where(mask, values, 0)
    np.testing.assert_array_equal(project.annotations[...], expected)
    human, known = project.human_labels()
    np.testing.assert_array_equal(known, expected_mask)
    np.testing.assert_array_equal(human, expected)
    assert project.annotated_slices() == [1, 2, 3]
    assert (edit.n_voxels, edit.whole_slices, edit.region) == (int(mask.sum()), False, region)


def test_partial_region_whole_slice_annotation_annotates_the_rest(project):
    region = (slice(2, 3), slice(4, 8), slice(4, 8))
    project.apply_edit("annotation", region, np.full((1, 4, 4), 3, np.uint16), whole_slices=True)
    assert project.annotated[2].all() and not project.annotated[[0, 1, 3, 4, 5]].any()
    expected = np.zeros(SHAPE, np.uint16)
    expected[region] = 3
    np.testing.assert_array_equal(project.annotations[...], expected)
    np.testing.assert_array_equal(project.final[...], expected)


def test_unannotation_forgets_labels(project, labels):
    project.annotate_slices(labels, [2])
    region = (slice(2, 3), slice(0, 8), slice(0, 32))
    edit = project.apply_edit("unannotation", region)
    assert edit.kind == "unannotation"
    assert not project.annotated[region].any() and project.annotated[2, 8:].all()
    assert not project.annotations[region].any()
    expected = labels.copy()
    expected[:2] = expected[3:] = 0
    expected[region] = 0
    np.testing.assert_array_equal(project.final[...], expected)


def test_edits_crossing_chunk_boundaries(tmp_path):
    # (3, 520, 16) is chunked (1, 512, 16): the edit crosses chunks along Z and Y.
    image = np.arange(3 * 520 * 16, dtype=np.uint32).reshape(3, 520, 16)
    project = Project.create(tmp_path / "c.zarr", image)
    assert project.image.chunks == (1, 512, 16)
    region = (slice(0, 3), slice(500, 520), slice(2, 14))
    rng = np.random.default_rng(2)
    values = rng.integers(1, 4, (3, 20, 12)).astype(np.uint16)
    mask = rng.random((3, 20, 12)) < 0.7
    project.apply_edit("annotation", region, values, mask)
    project.apply_edit(
        "annotation",
        (slice(1, 2), slice(505, 515), slice(0, 4)),
        np.full((1, 10, 4), 9, np.uint8),
        whole_slices=True,
    )
    expected = np.zeros(image.shape, np.uint16)
    expected[region] = np.where(mask, values, 0)
    expected[1, 505:515, 0:4] = 9
    known = np.zeros(image.shape, bool)
    known[region] = mask
    known[1] = True
    again = Project.open(project.path, image=image)
    np.testing.assert_array_equal(again.annotations[...], expected)
    np.testing.assert_array_equal(again.annotated[...] > 0, known)
    np.testing.assert_array_equal(again.final[...], np.where(known, expected, 0))


def test_edit_ids_continue_after_reopen(project, labels):
    project.annotate_slices(labels, [0, 1])
    again = Project.open(project.path)
    (edit,) = again.annotate_slices(labels, [5])
    assert edit.id == 3 and again.revision == 3
    assert [e.id for e in Project.open(project.path).edits()] == [1, 2, 3]


# ----------------------------------------------------------------- corrections
def test_corrections_need_a_round(project, labels):
    before = state(project.path)
    with pytest.raises(ProjectError, match="no round to correct yet; train a round first"):
        project.correct_slices(labels, [2])
    region = (slice(2, 3), slice(0, 4), slice(0, 4))
    with pytest.raises(
        ProjectError, match="cannot correct round 1: the latest committed round is 0"
    ):
        project.apply_edit("correction", region, np.ones((1, 4, 4), np.uint16), round=1)
    with pytest.raises(InvalidInputError, match=r"needs the round it corrects \(>= 1\), got 0"):
        project.apply_edit("correction", region, np.ones((1, 4, 4), np.uint16))
    assert_same_state(before, state(project.path))
    commit_round(project)
    with pytest.raises(ProjectError, match="cannot correct round 2"):
        project.correct_slices(labels, [2], round=2)


def test_corrections_have_provenance_and_win(project, labels):
    project.annotate_slices(labels, [2, 3])  # slice 3: annotated background
    commit_round(project, value=5)
    fix = np.zeros(SHAPE, np.uint16)
    fix[3, 0:4, 0:4] = 4  # the annotator overrules the annotation of slice 3
    fix[0, 10:20, 10:20] = 1  # and the model on slice 0
    t0 = time.strftime("%Y-%m-%d")
    edits = project.correct_slices(fix, [0, 3], source="widget")
    region = (slice(5, 6), slice(0, 2), slice(0, 2))
    edits.append(
        project.apply_edit(
            "correction", region, np.full((1, 2, 2), 7, np.uint16), round=1, source="cli"
        )
    )
    for edit, source in zip(edits, ("widget", "widget", "cli"), strict=True):
        assert (edit.kind, edit.round, edit.source) == ("correction", 1, source)
        assert edit.time.startswith(t0)
    assert edits[0].region == (slice(0, 1), slice(0, 32), slice(0, 32))
    assert edits[2].region == region
    assert project.edits()[-3:] == edits
    assert project.corrected_slices() == [0, 3, 5]
    np.testing.assert_array_equal(
        project.corrected[...] > 0, (fix >= 0) & _on_slices([0, 3]) | _box(region)
    )

    expected = np.full(SHAPE, 5, np.uint16)  # pseudo-labels of round 1
    expected[2] = labels[2]  # annotation over pseudo
    expected[3] = 0  # annotated background over pseudo...
    expected[[0, 3]] = fix[[0, 3]]  # ...and corrections over both
    expected[region] = 7
    np.testing.assert_array_equal(project.merged_labels(), expected)
    # Edits refresh ``final`` where they land; the rest waits for refresh_final (a round's
    # pseudo-labels reach ``final`` through it, as the engine calls it after commit).
    edited = _on_slices([0, 3]) | _box(region)
    np.testing.assert_array_equal(project.final[...][edited], expected[edited])
    project.refresh_final()
    np.testing.assert_array_equal(project.final[...], expected)
    human, known = project.human_labels()
    np.testing.assert_array_equal(known, _on_slices([0, 2, 3]) | _box(region))
    np.testing.assert_array_equal(human[known], expected[known])


def _on_slices(slices):
    out = np.zeros(SHAPE, bool)
    out[slices] = True
    return out


def _box(region):
    out = np.zeros(SHAPE, bool)
    out[region] = True
    return out


def test_a_new_round_never_changes_human_work(project, labels):
    project.annotate_slices(labels, [2, 4])
    commit_round(project, value=5)
    fix = np.full(SHAPE, 3, np.uint16)
    project.correct_slices(fix, [0])
    before = arrays(project, HUMAN)
    human_files = _file_digests(
        project.path,
        (
            "labels/annotations",
            "labels/corrections",
            "ssl_seg/annotated",
            "ssl_seg/corrected",
            "ssl_seg/edits",
        ),
    )
    writer = project.begin_round()
    writer.write(..., np.full(SHAPE, 9, np.uint16), np.ones(SHAPE, np.float32))
    for name, values in arrays(project, HUMAN).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    writer.commit({"method": "cps"}, b"round two")
    project.refresh_final()
    assert project.latest_round == 2
    for name, values in arrays(Project.open(project.path), HUMAN).items():
        np.testing.assert_array_equal(values, before[name], err_msg=name)
    assert _file_digests(project.path, list(human_files)) == human_files
    expected = np.full(SHAPE, 9, np.uint16)
    expected[[2, 4]] = labels[[2, 4]]
    expected[0] = 3
    np.testing.assert_array_equal(project.final[...], expected)
    np.testing.assert_array_equal(project.merged_labels(1)[1], 5)  # older rounds stay readable


def _file_digests(root, folders):
    out = {}
    for folder in folders:
        out[folder] = {
            str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted((Path(root) / folder).rglob("*"))
            if f.is_file()
        }
    return out


# ---------------------------------------------------------------------- rounds
def test_a_round_exists_only_after_commit(project):
    writer = project.begin_round()
    assert writer.round == 1
    writer.write(..., np.ones(SHAPE, np.uint16), np.ones(SHAPE, np.float32))
    assert (project.latest_round, project.rounds()) == (0, [])
    with pytest.raises(ProjectError, match="no round yet; train one first"):
        project.pseudo_labels()
    again = Project.open(project.path)
    assert again.latest_round == 0
    assert not again.merged_labels().any()
    # The writer lives on (it holds its reservation): its number is not handed out again.
    assert again.begin_round().round == 2
    assert (
        "pseudo_r001"
        not in zarr.open_group(project.path, mode="r")["labels"].attrs["ome"]["labels"]
    )


def test_round_record_and_checkpoint(project):
    checkpoint = bytes(range(256)) * 10
    record = commit_round(project, value=2, confidence=0.75, checkpoint=checkpoint)
    assert record["round"] == 1 and record["method"] == "mean_teacher" and record["revision"] == 0
    assert record["checkpoint"] == "checkpoint.pt"
    assert record["pseudo_labels"] == "labels/pseudo_r001"
    assert record["confidence"] == "ssl_seg/confidence_r001"
    path = project.checkpoint_path(1)
    assert path == project.path / "ssl_seg/rounds/r001/checkpoint.pt"
    assert path.read_bytes() == checkpoint
    assert record["checkpoint_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    again = Project.open(project.path)
    assert again.latest_round == 1
    assert again.rounds() == [record] and again.round_record(1) == record
    with pytest.raises(ProjectError, match=r"no round 2 \(rounds: \[1\]\)"):
        again.round_record(2)
    np.testing.assert_array_equal(again.pseudo_labels()[...], 2)
    assert again.confidence(1).dtype == np.float32
    np.testing.assert_array_equal(again.confidence()[...], 0.75)
    assert again.begin_round().round == 2


# ------------------------------------------------------------------ crash safety
_THROTTLE = """
import sys, time
import zarr.storage
DELAY = float(sys.argv[3])
if DELAY:
    _set = zarr.storage.LocalStore.set

    async def _slow_set(self, key, value):
        if "/c/" in key:  # chunk data, not metadata
            time.sleep(DELAY)
        return await _set(self, key, value)

    zarr.storage.LocalStore.set = _slow_set
"""

_CHILD_EDIT = (
    _THROTTLE
    + """
import numpy as np
from napari_ssl_seg.store import Project
project = Project.open(sys.argv[1], verify=False)
edit = np.load(sys.argv[2])
region = tuple(slice(0, n) for n in project.shape)
project.apply_edit("annotation", region, edit["values"], edit["mask"], source="child")
"""
)

_CHILD_CREATE = (
    _THROTTLE
    + """
import numpy as np
from napari_ssl_seg.store import Project
image = np.arange(64 * 128 * 128, dtype=np.uint32).reshape(64, 128, 128)
Project.create(sys.argv[1], image, overwrite=sys.argv[2] == "overwrite")
"""
)


def _kill_when(args, code, ready, *, timeout=60.0):
    """Run ``code`` in a child, SIGKILL it once ``ready()``; True if it finished first."""
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + timeout
        while not ready() and proc.poll() is None:
            assert time.monotonic() < deadline, "the child never reached the point to kill it"
            time.sleep(0.001)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if finished:
        assert proc.returncode == 0, err.decode()
    else:
        assert proc.returncode == -signal.SIGKILL, err.decode()
    return finished


def _chunk_files(folder):
    return [f for f in Path(folder).rglob("*") if f.is_file() and "partial" not in f.name]


@pytest.mark.parametrize("delay", [0.0, 0.01], ids=["full-speed", "slowed"])
def test_edit_killed_mid_write_is_replayed_on_open(tmp_path, delay):
    shape = (64, 256, 256)
    image = np.zeros(shape, np.uint8)
    project = Project.create(tmp_path / "big.zarr", image, source="big")
    first = np.zeros(shape, np.uint16)
    first[0, :64, :64] = 7
    project.annotate_slices(first, [0])
    z, y, x = np.indices(shape, dtype=np.uint16)
    values = (z + 2 * y + 3 * x) % 5 + 1
    mask = np.ones(shape, bool)
    mask[:, :64, :64] = False  # the earlier edit's corner is left alone
    np.savez(tmp_path / "edit.npz", values=values, mask=mask)
    expected = np.where(mask, values, 0).astype(np.uint16)
    expected[0, :64, :64] = 7
    known = mask.copy()
    known[0] = True
    before = arrays(project, ("annotations", "annotated", "final"))

    log = project.path / "ssl_seg" / "edits"
    ann_chunks = project.path / "labels" / "annotations" / "0" / "c"

    def ready():
        if not (log / "000002.npz").exists():
            return False
        return delay == 0 or len(_chunk_files(ann_chunks)) >= 4

    finished = _kill_when([project.path, tmp_path / "edit.npz", delay], _CHILD_EDIT, ready)
    done = (log / "000002.done").exists()
    seen = Project.open(project.path, recover=False, verify=False)
    ann = np.asarray(seen.annotations[...])
    partial = not (ann == expected).all() and not (ann == before["annotations"]).all()
    print(
        f"child finished before the kill: {finished}; .done: {done}; partial state seen: {partial}"
    )
    if delay:
        # Slowed, the kill certainly lands inside the array writes.
        assert not finished and not done and partial
    assert [e.id for e in seen.edits()] == [1, 2]  # the edit was logged whole

    recovered = Project.open(project.path)
    np.testing.assert_array_equal(recovered.annotations[...], expected)
    np.testing.assert_array_equal(recovered.annotated[...] > 0, known)
    np.testing.assert_array_equal(recovered.final[...], expected)
    assert not recovered.corrected[...].any()
    assert (log / "000002.done").exists() and recovered.revision == 2
    assert [(e.id, e.source) for e in recovered.edits()] == [(1, "api"), (2, "child")]


def _edit_annotation(project, labels):
    region = (slice(1, 5), slice(8, 24), slice(8, 24))
    mask = np.random.default_rng(3).random((4, 16, 16)) < 0.6
    project.apply_edit("annotation", region, np.full((4, 16, 16), 2, np.uint8), mask)


def _edit_whole_slices(project, labels):
    region = (slice(1, 5), slice(8, 12), slice(8, 12))
    project.apply_edit("annotation", region, np.full((4, 4, 4), 3, np.uint8), whole_slices=True)


def _edit_unannotation(project, labels):
    project.apply_edit("unannotation", (slice(1, 5), slice(0, 16), slice(0, 32)))


def _edit_correction(project, labels):
    region = (slice(1, 5), slice(0, 32), slice(4, 20))
    mask = np.random.default_rng(4).random((4, 32, 16)) < 0.5
    project.apply_edit("correction", region, labels[region] + 1, mask, round=1)


@pytest.mark.parametrize(
    "make_edit", [_edit_annotation, _edit_whole_slices, _edit_unannotation, _edit_correction]
)
def test_replay_restores_a_crash_state(project, labels, make_edit):
    project.annotate_slices(labels, [0, 1, 2, 3, 4, 5])
    commit_round(project)
    before = arrays(project)
    make_edit(project, labels)
    after = arrays(project)
    last = project.edits()[-1].id
    assert any((after[n] != before[n]).any() for n in HUMAN)
    # A crash after the log entry and some chunks: slices 1-2 new, 3-4 still old.
    (project.path / "ssl_seg" / "edits" / f"{last:06d}.done").unlink()
    for name in ("final", *HUMAN):
        getattr(project, name)[3:5] = before[name][3:5]
    crashed = arrays(Project.open(project.path, recover=False))
    assert any((crashed[n] != after[n]).any() for n in HUMAN)

    recovered = Project.open(project.path)
    for name, values in arrays(recovered).items():
        np.testing.assert_array_equal(values, after[name], err_msg=name)
    assert recovered.revision == last
    assert (project.path / "ssl_seg" / "edits" / f"{last:06d}.done").exists()


@pytest.mark.parametrize(
    "garbage",
    [b"", b"\x00garbage\xff" * 10, "truncated"],
    ids=["empty", "garbage", "truncated"],
)
def test_corrupt_unfinished_edit_is_discarded(project, labels, garbage):
    project.annotate_slices(labels, [2])
    if garbage == "truncated":
        whole = project.path / "ssl_seg" / "edits" / "000001.npz"
        garbage = whole.read_bytes()[: whole.stat().st_size // 2]
    before = state(project.path)
    bad = project.path / "ssl_seg" / "edits" / "000002.npz"
    bad.write_bytes(garbage)
    again = Project.open(project.path)
    assert not bad.exists()
    assert_same_state(before, state(project.path))
    assert again.revision == 1
    (edit,) = again.annotate_slices(labels, [4])
    assert edit.id == 2


@pytest.mark.parametrize("overwrite", [False, True])
def test_create_killed_mid_write_leaves_no_project(tmp_path, image, overwrite):
    target = tmp_path / "p.zarr"
    if overwrite:
        Project.create(target, image).annotate_slices(np.ones(SHAPE, np.uint8), [3])
        before = state(target)

    def ready():
        return any(
            len(_chunk_files(p / "0" / "c")) >= 4 for p in tmp_path.glob(".p.zarr.*.partial")
        )

    finished = _kill_when(
        [target, "overwrite" if overwrite else "new", 0.01], _CHILD_CREATE, ready
    )
    assert not finished
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "p.zarr"]
    assert all(n.startswith(".p.zarr.") and n.endswith(".partial") for n in leftovers), leftovers
    if overwrite:
        assert_same_state(before, state(target))  # the old project is untouched
    else:
        assert not target.exists()
        with pytest.raises(ProjectError, match="no such project directory"):
            Project.open(target)
    fresh = Project.create(target, image, overwrite=True)
    np.testing.assert_array_equal(Project.open(fresh.path, image=image).image[...], image)


class FailingVolume:
    """A source that fails while being copied (a network drive going away)."""

    shape, dtype = SHAPE, np.dtype(np.uint16)

    def __getitem__(self, index):
        raise OSError("the drive went away")


def test_failed_overwrite_keeps_the_old_project(project, labels):
    project.annotate_slices(labels, [2])
    before = state(project.path)
    with pytest.raises(OSError, match="the drive went away"):
        Project.create(project.path, FailingVolume(), overwrite=True)
    assert_same_state(before, state(project.path))
    assert [p.name for p in project.path.parent.iterdir()] == ["p.zarr"]


# ----------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("make", "kwargs", "error", "match"),
    [
        (
            lambda: np.zeros((32, 32)),
            {},
            InvalidInputError,
            r"expected a 3D volume .* got 2 dimension",
        ),
        (lambda: np.zeros((2, 6, 32, 32)), {}, InvalidInputError, r"got 4 dimension\(s\)"),
        (
            lambda: _with(np.zeros(SHAPE, np.float32), np.nan),
            {},
            InvalidInputError,
            "holds NaN values",
        ),
        (lambda: _with(np.zeros(SHAPE), np.inf), {}, InvalidInputError, "holds inf values"),
        (lambda: np.zeros(SHAPE, complex), {}, InvalidInputError, "expected numeric voxels"),
        (lambda: np.zeros(SHAPE), {"axis": 3}, InvalidInputError, "axis must be 0, 1 or 2, got 3"),
        (
            lambda: np.zeros(SHAPE),
            {"axis": -1},
            InvalidInputError,
            "axis must be 0, 1 or 2, got -1",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"axis": True},
            InvalidInputError,
            "axis must be 0, 1 or 2, got True",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"axis": "0"},
            InvalidInputError,
            "axis must be 0, 1 or 2, got '0'",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"voxel_size": (1, 1)},
            InvalidInputError,
            r"voxel_size must be 3 positive numbers \(Z, Y, X\), got \(1, 1\)",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"voxel_size": (0, 1, 1)},
            InvalidInputError,
            "voxel_size must be 3 positive",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"voxel_size": (np.nan, 1, 1)},
            InvalidInputError,
            "got \\(nan, 1, 1\\)",
        ),
        (
            lambda: np.zeros(SHAPE),
            {"voxel_size": ("a", 1, 1)},
            InvalidInputError,
            "got \\('a', 1, 1\\)",
        ),
        (lambda: np.zeros(SHAPE), {"voxel_size": 1.0}, InvalidInputError, "got 1.0"),
    ],
)
def test_create_bad_inputs(project, labels, make, kwargs, error, match):
    project.annotate_slices(labels, [2])
    before = state(project.path)
    with pytest.raises(error, match=match):
        Project.create(project.path, make(), overwrite=True, **kwargs)
    assert_same_state(before, state(project.path))
    assert [p.name for p in project.path.parent.iterdir()] == ["p.zarr"]


def _with(array, value):
    array[1, 2, 3] = value
    return array


def test_create_over_an_existing_path_needs_overwrite(project, labels, tmp_path):
    project.annotate_slices(labels, [2])
    before = state(project.path)
    with pytest.raises(
        PathExistsError, match=r"p\.zarr already exists; pass overwrite=True to replace it"
    ):
        Project.create(project.path, np.ones((2, 2, 2), np.uint8))
    assert_same_state(before, state(project.path))
    (tmp_path / "file.zarr").write_text("not a directory")
    with pytest.raises(PathExistsError, match="already exists"):
        Project.create(tmp_path / "file.zarr", np.ones((2, 2, 2), np.uint8))
    assert (tmp_path / "file.zarr").read_text() == "not a directory"


_FLOAT = np.zeros(SHAPE, np.float32)
_NEG = np.full(SHAPE, -1, np.int16)
_R = (slice(2, 3), slice(0, 4), slice(0, 4))
_V = np.ones((1, 4, 4), np.uint16)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda p, lab: p.annotate_slices(_FLOAT, [2]),
            InvalidInputError,
            "labels: labels must be integers .* got dtype float32",
        ),
        (
            lambda p, lab: p.annotate_slices(_NEG, [2]),
            InvalidInputError,
            "labels: labels must be >= 0, found -1",
        ),
        (
            lambda p, lab: p.annotate_slices(lab[:, :, :31], [2]),
            InvalidInputError,
            r"labels: shape \(6, 32, 31\) does not match the image shape \(6, 32, 32\)",
        ),
        (
            lambda p, lab: p.annotate_slices(lab, [1, 6]),
            InvalidInputError,
            r"slices \[6\] are outside 0\.\.5 along axis 0",
        ),
        (
            lambda p, lab: p.annotate_slices(lab, [-1]),
            InvalidInputError,
            r"slices \[-1\] are outside",
        ),
        (
            lambda p, lab: p.annotate_slices(lab, [1, 2.0]),
            InvalidInputError,
            r"slices must be integers, got \[2\.0\]",
        ),
        (
            lambda p, lab: p.apply_edit(
                "annotation", (slice(0, 7), slice(0, 4), slice(0, 4)), np.ones((7, 4, 4), np.uint8)
            ),
            InvalidInputError,
            r"is empty, strided or outside the image shape \(6, 32, 32\)",
        ),
        (
            lambda p, lab: p.apply_edit("unannotation", (slice(-2, 6), slice(0, 4), slice(0, 4))),
            InvalidInputError,
            "outside the image shape",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", (slice(2, 2), slice(0, 4), slice(0, 4)), _V),
            InvalidInputError,
            "is empty",
        ),
        (
            lambda p, lab: p.apply_edit(
                "annotation", (slice(0, 6, 2), slice(0, 4), slice(0, 4)), _V
            ),
            InvalidInputError,
            "strided",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", (slice(2, 3), slice(0, 4)), _V),
            InvalidInputError,
            r"region must be 3 slices \(Z, Y, X\)",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", (2, slice(0, 4), slice(0, 4)), _V),
            InvalidInputError,
            "region must be 3 slices",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", _R, _V, np.ones((1, 4, 5), bool)),
            InvalidInputError,
            r"mask shape \(1, 4, 5\) does not match the region \(1, 4, 4\)",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", _R, np.ones((1, 4, 5), np.uint8)),
            InvalidInputError,
            r"annotation values: shape \(1, 4, 5\) does not match",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", _R, _V.astype(float)),
            InvalidInputError,
            "annotation values: labels must be integers",
        ),
        (
            lambda p, lab: p.apply_edit("annotation", _R),
            InvalidInputError,
            "'annotation' edit needs values",
        ),
        (
            lambda p, lab: p.apply_edit("annotate", _R, _V),
            InvalidInputError,
            r"kind must be one of \('annotation', 'unannotation', 'correction'\), got 'annotate'",
        ),
        (lambda p, lab: p.correct_slices(lab, [2]), ProjectError, "no round to correct yet"),
        (
            lambda p, lab: p.refresh_final((slice(0, 9), slice(None), slice(None))),
            InvalidInputError,
            "outside the image shape",
        ),
    ],
)
def test_edit_bad_inputs(project, labels, call, error, match):
    project.annotate_slices(labels, [0])
    before = state(project.path)
    with pytest.raises(error, match=match):
        call(project, labels)
    assert_same_state(before, state(project.path))
    assert project.annotate_slices(labels, [5])[0].id == 2  # the project still works


def test_open_bad_paths(tmp_path):
    with pytest.raises(ProjectError, match=r"missing\.zarr: no such project directory$"):
        Project.open(tmp_path / "missing.zarr")
    (tmp_path / ".gone.zarr.123.old").mkdir()
    with pytest.raises(
        ProjectError, match=r"an interrupted overwrite left the old one at .*\.old"
    ):
        Project.open(tmp_path / "gone.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ProjectError, match=r"empty is not a napari-ssl-seg project \(no zarr\.json\)"
    ):
        Project.open(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("hello")
    with pytest.raises(ProjectError, match="is not a napari-ssl-seg project"):
        Project.open(tmp_path / "file.txt")
    zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    with pytest.raises(ProjectError, match=r"no zarr\.json"):
        Project.open(tmp_path / "v2.zarr")
    plain = zarr.open_group(tmp_path / "plain.zarr", mode="w", zarr_format=3)
    plain.attrs["napari_ssl_seg"] = {"axis": 0}
    with pytest.raises(
        ProjectError, match=r"plain\.zarr is a Zarr group but not a napari-ssl-seg project"
    ):
        Project.open(tmp_path / "plain.zarr")
    zarr.create_array(tmp_path / "array.zarr", shape=(2, 2, 2), dtype="u1", zarr_format=3)
    with pytest.raises(ProjectError, match=r"array\.zarr: cannot read the project metadata"):
        Project.open(tmp_path / "array.zarr")


def _damage_meta(path, **changes):
    root = zarr.open_group(path, mode="r+")
    meta = dict(root.attrs["napari_ssl_seg"])
    meta.update(changes)
    root.attrs["napari_ssl_seg"] = meta


@pytest.mark.parametrize(
    ("damage", "error", "match"),
    [
        (
            lambda p: (p / "zarr.json").write_bytes(b"\x00\xffgarbage"),
            ProjectError,
            "cannot read the project metadata",
        ),
        (
            lambda p: (p / "zarr.json").write_text(
                '{"zarr_format": 3, "node_type": "group", "attributes": {'
            ),
            ProjectError,
            "cannot read the project metadata",
        ),
        (
            lambda p: (p / "labels" / "final" / "0" / "zarr.json").write_bytes(b"\x00garbage"),
            ProjectError,
            "the project is damaged: JSONDecodeError",
        ),
        (
            lambda p: _rmtree(p / "ssl_seg" / "annotated"),
            ProjectError,
            "the project is damaged: missing array 'ssl_seg/annotated'",
        ),
        (lambda p: _rmtree(p / "0"), ProjectError, "missing array '0'"),
        (
            lambda p: zarr.open_group(p / "ssl_seg", mode="r+").create_array(
                "corrected", shape=(6, 32, 31), dtype="u2", overwrite=True
            ),
            ProjectError,
            r"corrected has shape \(6, 32, 31\), the image \(6, 32, 32\)",
        ),
        (
            lambda p: _damage_meta(p, schema_version=SCHEMA_VERSION + 1),
            ProjectError,
            (
                rf"project schema {SCHEMA_VERSION + 1} is newer than this napari-ssl-seg "
                rf"understands \({SCHEMA_VERSION}\); upgrade napari-ssl-seg"
            ),
        ),
        (lambda p: _damage_meta(p, schema_version="one"), ProjectError, "schema_version is 'one'"),
        (lambda p: _damage_meta(p, axis=7), ProjectError, "the project is damaged: axis is 7"),
        (
            lambda p: zarr.open_array(p / "0", mode="r+").__setitem__((0, 0, 0), 1001),
            ProjectError,
            r"the stored image does not match its signature \(damaged\)",
        ),
    ],
)
def test_open_damaged_projects(project, damage, error, match):
    damage(project.path)
    with pytest.raises(error, match=match):
        Project.open(project.path)


def _rmtree(path):
    import shutil

    shutil.rmtree(path)


def test_open_with_another_image(project, image):
    before = state(project.path)
    other = image.copy()
    other[5, 31, 31] += 1
    for wrong in (other, image[:5], image.astype(np.int32)):
        with pytest.raises(SignatureMismatchError, match="this project belongs to another image"):
            Project.open(project.path, image=wrong)
    assert issubclass(SignatureMismatchError, ProjectError)
    assert_same_state(before, state(project.path))
    Project.open(project.path, image=image)


def test_open_readers_do_not_write(project, labels):
    project.annotate_slices(labels, [2])
    (project.path / "ssl_seg" / "edits" / "000001.done").unlink()
    before = state(project.path)
    Project.open(project.path, recover=False)
    assert_same_state(before, state(project.path))


# -------------------------------------------------------------- other slice axes
@pytest.mark.parametrize("axis", [1, 2])
def test_projects_along_another_axis(tmp_path, axis):
    shape = (5, 6, 7)
    image = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape)
    project = Project.create(tmp_path / "a.zarr", image, axis=axis)
    assert project.axis == axis and project.n_slices == shape[axis]
    assert project.image.chunks == tuple(1 if a == axis else n for a, n in enumerate(shape))
    lab = np.zeros(shape, np.uint16)
    lab[project.slice_index(3)] = 2
    edits = project.annotate_slices(lab, [0, 3])
    assert edits[0].region == tuple(
        slice(0, 1) if a == axis else slice(0, n) for a, n in enumerate(shape)
    )
    expected_mask = np.zeros(shape, bool)
    expected_mask[project.slice_index(0)] = expected_mask[project.slice_index(3)] = True
    again = Project.open(project.path, image=image)
    assert again.axis == axis
    np.testing.assert_array_equal(again.annotated[...] > 0, expected_mask)
    np.testing.assert_array_equal(again.annotations[...], lab)
    assert again.annotated_slices() == [0, 3]
    with pytest.raises(
        InvalidInputError,
        match=rf"slices \[{shape[axis]}\] are outside 0\.\.{shape[axis] - 1} "
        rf"along axis {axis}",
    ):
        again.annotate_slices(lab, [shape[axis]])
    # A partial whole-slice edit annotates the rest of that slice along this axis.
    region = [slice(0, 2)] * 3
    region[axis] = slice(4, 5)
    box = tuple(s.stop - s.start for s in region)
    again.apply_edit("annotation", tuple(region), np.ones(box, np.uint8), whole_slices=True)
    expected_mask[again.slice_index(4)] = True
    np.testing.assert_array_equal(again.annotated[...] > 0, expected_mask)
    assert again.annotated_slices() == [0, 3, 4]
    commit_round(again, value=1)
    fix = np.full(shape, 4, np.uint16)
    again.correct_slices(fix, [1])
    assert again.corrected_slices() == [1]
    merged = again.merged_labels()
    np.testing.assert_array_equal(merged[again.slice_index(1)], 4)
    np.testing.assert_array_equal(merged[again.slice_index(3)], 2)
    np.testing.assert_array_equal(merged[again.slice_index(2)], 1)


# ------------------------------------------------ create with labels, safe overwrite
def test_create_with_labels_annotates_before_the_swap(project, image, labels):
    project.annotate_slices(labels, [2])
    before = state(project.path)
    with pytest.raises(InvalidInputError, match=r"shape \(2, 2, 2\) does not match"):
        Project.create(project.path, image, labels=np.zeros((2, 2, 2), np.uint8), overwrite=True)
    with pytest.raises(InvalidInputError, match=r"slices \[9\] are outside 0\.\.5"):
        Project.create(project.path, image, labels=labels, annotated_slices=[4, 9], overwrite=True)
    assert_same_state(before, state(project.path))
    assert [p.name for p in project.path.parent.iterdir()] == ["p.zarr"]
    fresh = Project.create(
        project.path, image, labels=labels, annotated_slices=[0, 4], overwrite=True
    )
    assert fresh.annotated_slices() == [0, 4]
    assert [e.kind for e in fresh.edits()] == ["annotation", "annotation"]
    np.testing.assert_array_equal(fresh.final[4], labels[4])
    default = Project.create(project.path, image, labels=labels, overwrite=True)
    assert default.annotated_slices() == [2, 4]  # the slices holding a label
    with pytest.raises(InvalidInputError, match="annotated_slices needs labels"):
        Project.create(project.path, image, annotated_slices=[1], overwrite=True)


@pytest.mark.parametrize("kind", ["folder", "file", "zarr group", "zarr array"])
def test_overwrite_replaces_only_a_project(tmp_path, image, kind):
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif kind == "file":
        target.write_text("mine")
    elif kind == "zarr group":
        zarr.open_group(target, mode="w", attributes={"mine": 1})
    else:
        zarr.save_array(target, np.arange(3))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(
        ProjectError, match=r"target is not a napari-ssl-seg project; refusing to replace it"
    ):
        Project.create(target, image, overwrite=True)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_annotate_and_correct_refuse_labels_that_are_not_classes(project, labels):
    instances = labels.copy()
    instances[3].flat[:300] = np.arange(1, 301)
    with pytest.raises(InvalidInputError, match=r"301 distinct values / max label 300"):
        project.annotate_slices(instances, [3])
    assert project.annotated_slices() == []
    project.annotate_slices(instances, [3], max_classes=300)
    assert project.annotated_slices() == [3]
    commit_round(project, 1)
    with pytest.raises(InvalidInputError, match=r"max label 300"):
        project.correct_slices(instances, [3])
    assert project.corrected_slices() == []
    project.correct_slices(instances, [3], max_classes=1000)
    assert project.corrected_slices() == [3]
