"""One writer per project, durable writes and damaged chunks, on real stores and processes.

The concurrency tests run real child processes (``python -c``) against a project in
``tmp_path``; they start together behind a file barrier so that their writes overlap.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_ssl_seg.cli import main
from napari_ssl_seg.errors import ProjectError, ProjectLockedError
from napari_ssl_seg.store import Project

SHAPE = (6, 32, 32)

# Children wait for every sibling to be ready, then for "go": their writes overlap.
_BARRIER = """
import sys, time
from pathlib import Path
from napari_ssl_seg.store import Project
project_path, barrier, who = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
project = Project.open(project_path)
project.lock_timeout = 60.0
(barrier / f"ready{who}").touch()
while not (barrier / "go").exists():
    time.sleep(0.001)
"""

_CHILD_EDITS = (
    _BARRIER
    + """
import numpy as np
for i in range(int(sys.argv[4])):
    # one voxel per edit: row `who`, column i
    region = (slice(2, 3), slice(who, who + 1), slice(i, i + 1))
    project.apply_edit("annotation", region, np.full((1, 1, 1), who + 1), source=f"p{who}-{i}")
"""
)

_CHILD_ROUND = (
    _BARRIER
    + """
import numpy as np
writer = project.begin_round()
shape = project.shape
for z in range(shape[0]):
    block = np.full((1,) + shape[1:], who + 1, np.uint16)
    writer.write((slice(z, z + 1),), block, np.full(block.shape, 0.5, np.float32))
    time.sleep(0.05)  # the other child allocates its round meanwhile
writer.commit({"method": "test", "who": who}, f"weights of {who}".encode())
"""
)

_CHILD_HOLD = """
import sys, time
from napari_ssl_seg.store import Project
project = Project.open(sys.argv[1])
with project.writing(what="holding the lock for a test"):
    print("held", flush=True)
    time.sleep(120)
"""

_CHILD_RESERVE = """
import sys, time
import numpy as np
from napari_ssl_seg.store import Project
project = Project.open(sys.argv[1])
writer = project.begin_round()
writer.write(..., np.full(project.shape, 9, np.uint16), np.ones(project.shape, np.float32))
print(writer.round, flush=True)
time.sleep(120)  # killed here, its round uncommitted
"""


@pytest.fixture
def project(tmp_path):
    image = np.random.default_rng(0).integers(0, 1000, SHAPE).astype(np.uint16)
    return Project.create(tmp_path / "p.zarr", image, source="vol.tif")


def _run_together(tmp_path, project, code, extra_args, n=2, timeout=120):
    """Run ``code`` in ``n`` children started together; fail with their stderr if any fails."""
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    children = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(project.path), str(barrier), str(k)]
            + [str(a) for a in extra_args],
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(n)
    ]
    try:
        deadline = time.monotonic() + timeout
        while not all((barrier / f"ready{k}").exists() for k in range(n)):
            assert all(c.poll() is None for c in children), children[0].stderr.read()
            assert time.monotonic() < deadline, "the children never got ready"
            time.sleep(0.01)
        (barrier / "go").touch()
        for child in children:
            _, err = child.communicate(timeout=timeout)
            assert child.returncode == 0, err
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()


@pytest.fixture
def holder(project):
    """A child process holding ``project``'s writer lock until the test ends."""
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD_HOLD), str(project.path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    assert line.strip() == "held", child.stderr.read()
    yield child
    child.kill()
    child.wait()


# --------------------------------------------------------------------- one writer
def test_two_processes_editing_at_once_lose_no_edit(tmp_path, project):
    n = 12
    _run_together(tmp_path, project, _CHILD_EDITS, [n])
    edits = project.edits()
    assert [e.id for e in edits] == list(range(1, 2 * n + 1))  # unique, no gap
    assert sorted(e.source for e in edits) == sorted(f"p{k}-{i}" for k in (0, 1) for i in range(n))
    assert project.revision == 2 * n
    again = Project.open(project.path, recover=False)
    ann = np.asarray(again.annotations[2])
    for k in (0, 1):  # every edit applied
        np.testing.assert_array_equal(ann[k, :n], k + 1)
        assert again.annotated[2, k, :n].all()
    np.testing.assert_array_equal(again.final[2, :2, :n], ann[:2, :n])


def test_two_processes_beginning_rounds_take_distinct_numbers(tmp_path, project):
    _run_together(tmp_path, project, _CHILD_ROUND, [])
    rounds = project.rounds()
    assert sorted(r["round"] for r in rounds) == [1, 2]
    assert sorted(r["who"] for r in rounds) == [0, 1]
    for record in rounds:  # neither deleted or overwrote the other's arrays
        r, who = record["round"], record["who"]
        np.testing.assert_array_equal(project.pseudo_labels(r)[...], who + 1)
        assert (project.confidence(r)[...] == 0.5).all()
        assert project.checkpoint_bytes(r) == f"weights of {who}".encode()
    assert not list((project.path / "ssl_seg" / "rounds").glob("*/reserved.lock"))


def test_a_second_writer_is_told_who_holds_the_lock(project, holder):
    project.lock_timeout = 0.5
    started = time.monotonic()
    with pytest.raises(ProjectLockedError) as caught:
        project.apply_edit("annotation", (slice(0, 1),) * 3, np.ones((1, 1, 1), np.uint16))
    assert time.monotonic() - started < 3
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{project.path} is being written by pid {holder.pid} (")
    assert "holding the lock for a test" in message
    assert message.endswith("; try again when it finishes")
    assert " since " in message
    assert project.edits() == []  # nothing logged while waiting
    holder.kill()  # the OS frees the lock of a dead process
    holder.wait()
    project.apply_edit("annotation", (slice(0, 1),) * 3, np.ones((1, 1, 1), np.uint16))
    assert [e.id for e in project.edits()] == [1]


def test_every_write_path_waits_for_the_lock(project, holder):
    project.lock_timeout = 0.2
    labels = np.ones(SHAPE, np.uint16)
    for write in (
        lambda: project.annotate_slices(labels, [1]),
        lambda: project.refresh_final(),
        lambda: project.save_pretrained("x", b"weights"),
    ):
        with pytest.raises(ProjectLockedError, match=f"pid {holder.pid} "):
            write()
    assert not project.annotated[...].any()
    assert not project.pretrained_path("x").exists()


def test_readers_need_no_lock(project, holder):
    again = Project.open(project.path, recover=False)
    assert again.merged_labels().shape == SHAPE
    also = Project.open(project.path)  # recovering is skipped while a writer is live
    assert also.latest_round == 0


def test_the_lock_is_reentrant_and_excludes_other_threads(project):
    project.lock_timeout = 0.2
    other = Project.open(project.path)
    seen = []
    with project.writing():
        with other.writing():  # same thread, another Project object of the same directory
            project.apply_edit("annotation", (slice(0, 1),) * 3, np.ones((1, 1, 1), np.uint16))

        def edit():
            try:
                other.apply_edit("annotation", (slice(1, 2),) * 3, np.ones((1, 1, 1), np.uint16))
            except ProjectLockedError as err:
                seen.append(str(err))

        thread = threading.Thread(target=edit)
        thread.start()
        thread.join()
    assert len(seen) == 1 and f"pid {os.getpid()} " in seen[0]
    assert [e.id for e in project.edits()] == [1]


def test_cli_correct_while_another_process_writes(tmp_path, project, capsys, monkeypatch):
    writer = project.begin_round()
    writer.write(..., np.ones(SHAPE, np.uint16), np.ones(SHAPE, np.float32))
    writer.commit({"method": "test"}, b"weights")
    tifffile.imwrite(tmp_path / "lab.tif", np.full(SHAPE, 2, np.uint16))
    argv = ["correct", str(project.path), "--labels", str(tmp_path / "lab.tif"), "--slices", "2"]
    monkeypatch.setenv("NAPARI_SSL_SEG_LOCK_TIMEOUT", "0.5")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD_HOLD), str(project.path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(argv)
        err = capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert err.count("\n") == 1
    assert err.startswith("napari-ssl-seg correct: error: ")
    assert f"is being written by pid {holder.pid} (" in err
    assert Project.open(project.path).edits() == []
    assert main(argv) == 0  # once the writer is gone


def test_a_killed_round_reservation_is_reclaimed(project):
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(_CHILD_RESERVE), str(project.path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout.readline().strip() == "1"
        # alive: its number is not handed out
        writer = project.begin_round()
        assert writer.round == 2
        writer.abort()
        assert not (project.path / "ssl_seg" / "rounds" / "r002").exists()
    finally:
        child.kill()
        child.wait()
    writer = project.begin_round()  # the dead child's round 1 is removed and reused
    assert writer.round == 1
    assert not np.asarray(writer.pseudo[...]).any()
    writer.write(..., np.full(SHAPE, 3, np.uint16), np.ones(SHAPE, np.float32))
    writer.commit({"method": "test"}, b"w")
    assert [r["round"] for r in project.rounds()] == [1]
    np.testing.assert_array_equal(project.pseudo_labels(1)[...], 3)


# ---------------------------------------------------------------------- durability
@pytest.fixture
def fsync_log(monkeypatch):
    """Every fsync and rename, in order, as ("fsync" | "replace", path)."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, **kwargs):
        real_replace(src, dst, **kwargs)
        events.append(("replace", str(Path(dst).resolve())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_an_edit_is_on_disk_before_it_is_marked_done(project, fsync_log):
    root = project.path.resolve()
    region = (slice(1, 3), slice(0, 32), slice(0, 32))
    project.apply_edit("annotation", region, np.full((2, 32, 32), 4))
    done = str(root / "ssl_seg" / "edits" / "000001.done")
    marked = fsync_log.index(("replace", done))
    synced = {path for kind, path in fsync_log[:marked] if kind == "fsync"}
    for name in ("labels/annotations/0", "ssl_seg/annotated", "labels/final/0"):
        for z in (1, 2):
            chunk = root / name / "c" / str(z) / "0" / "0"
            assert str(chunk) in synced, chunk
            assert str(chunk.parent) in synced  # the rename that put it there
    # and the marker's own rename is made durable
    assert ("fsync", str(root / "ssl_seg" / "edits")) in fsync_log[marked:]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc to name fds")
def test_a_round_is_on_disk_before_its_record(project, fsync_log):
    root = project.path.resolve()
    writer = project.begin_round()
    writer.write(..., np.full(SHAPE, 2, np.uint16), np.full(SHAPE, 0.5, np.float32))
    writer.commit({"method": "test"}, b"weights")
    committed = fsync_log.index(("replace", str(root / "ssl_seg/rounds/r001/record.json")))
    synced = {path for kind, path in fsync_log[:committed] if kind == "fsync"}
    for z in range(SHAPE[0]):
        for name in ("labels/pseudo_r001/0", "ssl_seg/confidence_r001"):
            assert str(root / name / "c" / str(z) / "0" / "0") in synced
    # the checkpoint is fsynced under its temp name, then renamed into place
    assert any(Path(path).name.startswith(".checkpoint.pt.") for path in synced)
    assert ("replace", str(root / "ssl_seg/rounds/r001/checkpoint.pt")) in fsync_log[:committed]


def test_pretrained_weights_are_written_with_their_hash(project):
    path = project.save_pretrained("diffusion-abc", b"pretrained weights")
    assert path.read_bytes() == b"pretrained weights"
    assert project.load_pretrained("diffusion-abc") == b"pretrained weights"
    assert not [p for p in path.parent.iterdir() if "partial" in p.name]
    assert project.load_pretrained("other") is None
    path.write_bytes(b"pretrained weightz")
    with pytest.raises(ProjectError, match="does not match its recorded sha256"):
        project.load_pretrained("diffusion-abc")
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(ProjectError, match="no sha256 recorded"):
        project.load_pretrained("diffusion-abc")


# ------------------------------------------------------------------- damaged chunks
def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_cli_export_of_a_project_with_a_truncated_chunk(tmp_path, project, capsys):
    labels = np.zeros(SHAPE, np.uint16)
    labels[2, 4:12, 4:12] = 1
    project.annotate_slices(labels, [2])
    _truncate(project.path / "labels" / "annotations" / "0" / "c" / "2" / "0" / "0")
    code = main(["export", str(project.path), "--out", str(tmp_path / "out.tif")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1
    assert "array labels/annotations/0 is damaged" in err
    assert str(project.path) in err
    assert not (tmp_path / "out.tif").exists()


def test_open_verifying_a_truncated_image_chunk(project):
    _truncate(project.path / "0" / "c" / "3" / "0" / "0")
    with pytest.raises(ProjectError, match=r"array 0 \(the image\) is damaged") as caught:
        Project.open(project.path, verify=True)
    assert str(project.path) in str(caught.value)
    Project.open(project.path, verify=False)  # still opens for the rest to be saved


def test_merged_labels_with_a_truncated_round_chunk(project):
    writer = project.begin_round()
    writer.write(..., np.full(SHAPE, 2, np.uint16), np.full(SHAPE, 0.5, np.float32))
    writer.commit({"method": "test"}, b"weights")
    _truncate(project.path / "labels" / "pseudo_r001" / "0" / "c" / "1" / "0" / "0")
    with pytest.raises(ProjectError, match="array labels/pseudo_r001/0 is damaged"):
        project.merged_labels()
    json.loads((project.path / "ssl_seg" / "rounds" / "r001" / "record.json").read_text())


def test_strokes_a_locked_project_refused_are_written_later(project, holder):
    from napari_ssl_seg.annotation import AnnotationSession
    from napari_ssl_seg.errors import ProjectLockedError

    project.lock_timeout = 0.2
    session = AnnotationSession(project, background=True)
    layer = np.zeros(SHAPE, np.uint16)
    layer[1, 2:5, 2:5] = 2
    index = np.nonzero(layer)
    session.add_stroke("annotation", [(index, np.zeros(9), 2)])
    with pytest.raises(ProjectLockedError, match=r"being written by pid \d+"):
        session.flush_async(layer).result(30)
    assert session.pending  # kept, with its values
    layer[1, 2:5, 2:5] = 0  # what the layer shows later does not change what was painted
    holder.kill()
    holder.wait()
    saved = session.flush(layer)
    assert [e.kind for e in saved.edits] == ["annotation"] and not session.pending
    assert (project.annotations[1, 2:5, 2:5] == 2).all() and project.annotated_slices() == [1]
    session.close()


def test_overwrite_refuses_a_project_another_process_writes(project, holder):
    from napari_ssl_seg.errors import ProjectLockedError

    with pytest.raises(ProjectLockedError, match=r"being written by pid \d+"):
        Project.create(project.path, np.zeros(SHAPE, np.uint16), overwrite=True)
    holder.kill()
    holder.wait()
    assert Project.open(project.path).signature == project.signature  # the old one stays
    assert not list(project.path.parent.glob(".p.zarr.*"))  # and nothing half-made
