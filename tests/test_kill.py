"""kill -9 at random points of every kind of write: the project always opens and nothing
that was acknowledged is lost.

Each kind of write (annotation, brush stroke, correction, accept, mark and unmark, round
commit, checkpoint and pretraining cache, a whole training round) is run by a child
process that writes in a loop and sends an acknowledgement after every call that
returned, as a front end would tell its user "saved". The parent kills the child with
SIGKILL after a random delay (seeded, so a failure reproduces), then reopens the project
as a user would, checks it against the acknowledgements and writes to it again; the next
child carries on with the same project, 20 kills per kind.

Every write of a kind follows a plan that is a function of its step number alone, so the
parent can say what the human labels must be after any number of steps without asking
the product (see :func:`_plan` and :func:`_expected`).

The children are real processes forked from a multiprocessing fork server that imported
the package and torch once: a child then starts in milliseconds rather than seconds. The
kinds run side by side, each on its own project, in threads of the test.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import random
import signal
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from napari_ssl_seg.annotation import AnnotationSession
from napari_ssl_seg.errors import ProjectError
from napari_ssl_seg.store import Project

SHAPE = (6, 16, 16)
KILLS = 20
SEED = 21
# The children must get some writes acknowledged, or nothing acknowledged is checked (a
# child that never got going); a busy machine makes fewer, so this is a floor only.
MIN_ACKS = KILLS // 4
PRETRAINED = "kill-test"
EDIT_KINDS = ("annotation", "stroke", "correction", "accept", "mark")
# Longest wait before a kill, seconds: a child makes several writes of its kind by then
# (an edit takes ~30 ms here, a round ~100 ms, a tiny training round ~0.5 s).
MAX_DELAY = {
    **dict.fromkeys(EDIT_KINDS, 0.4),
    "round": 1.0,
    "checkpoint": 0.6,
    "pretrained": 0.3,
    "training": 1.5,
}


# ------------------------------------------------------------------------ the plans
def _plan(kind: str, s: int):
    """``(edit kind, region, values, mask)`` of step ``s`` of an edit ``kind``.

    Boxes of 4 x 4 walk over the slices; whole-slice writes take slice ``s % Z`` with a
    pattern that holds background too. Values change with ``s``, so a lost step shows.
    """
    z, k, v = s % SHAPE[0], (s // SHAPE[0]) % 16, s % 200 + 1
    y, x = (k // 4) * 4, (k % 4) * 4
    box = (slice(z, z + 1), slice(y, y + 4), slice(x, x + 4))
    if kind in ("annotation", "correction"):
        return kind, box, np.full((1, 4, 4), v, np.uint16), np.ones((1, 4, 4), bool)
    if kind == "stroke":  # a round brush dab: the box without its corners
        yy, xx = np.mgrid[:4, :4]
        mask = ((yy - 1.5) ** 2 + (xx - 1.5) ** 2 <= 2.6)[None]
        return "annotation", box, np.where(mask, v, 0).astype(np.uint16), mask
    whole = (slice(z, z + 1), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    pattern = np.where((yy + xx + s) % 3 > 0, v, 0).astype(np.uint16)[None]
    everything = np.ones(pattern.shape, bool)
    if kind == "accept":
        return "correction", whole, pattern, everything
    if kind == "mark":  # Z marks, then Z unmarks of the same slices, and again
        if (s // SHAPE[0]) % 2:
            return "unannotation", whole, np.zeros_like(pattern), everything
        return "annotation", whole, pattern, everything
    raise ValueError(kind)


def _expected(kind: str, n: int) -> np.ndarray:
    """The human labels after steps ``0..n-1`` of ``kind`` (-1: nobody labelled it)."""
    labels = np.full(SHAPE, -1, np.int64)
    for s in range(n):
        edit_kind, region, values, mask = _plan(kind, s)
        block = labels[region]
        if edit_kind == "unannotation":
            block[mask] = -1
        elif kind == "mark":  # only voxels nobody labelled take the layer's values
            block[block < 0] = values[block < 0]
        else:
            block[mask] = values[mask]
        if edit_kind == "annotation":  # a painted slice is annotated: the rest background
            plane = labels[region[0]]
            plane[plane < 0] = 0
    return labels


def _edit_step(kind: str, project: Project, session: AnnotationSession, layer, s: int) -> int:
    """Write step ``s`` of ``kind`` the way a front end does; returns the edit's id."""
    edit_kind, region, values, mask = _plan(kind, s)
    z = s % SHAPE[0]
    if kind == "annotation":
        return project.apply_edit(
            "annotation", region, values, mask, source="kill", whole_slices=True
        ).id
    if kind == "correction":
        return project.apply_edit("correction", region, values, mask, round=1, source="kill").id
    if kind == "stroke":  # a napari history item: (coordinates, old values, new values)
        coords = tuple(np.nonzero(mask)[a] + region[a].start for a in range(3))
        old = layer[coords].copy()
        layer[coords] = values[mask]
        session.add_stroke("annotation", [(coords, old, layer[coords].copy())])
        (edit,) = session.flush(annotation_data=layer).edits
        return edit.id
    if edit_kind == "unannotation":
        return session.unmark(z).id
    layer[region] = values
    if kind == "mark":
        return session.mark_annotated(z, layer).id
    if s % 2:  # accept: half through the session (the widget), half through the API
        return project.correct_slices(layer, [z], round=1, source="kill")[0].id
    return session.accept_slice(z, layer, round=1).id


def _pseudo(r: int) -> np.ndarray:
    z = np.arange(SHAPE[0], dtype=np.uint16)[:, None, None]
    return np.broadcast_to((r * 7 + z) % 250 + 1, SHAPE).astype(np.uint16)


def _checkpoint(kind: str, r: int) -> bytes:
    """Round ``r``'s checkpoint: large for "checkpoint" (see :func:`_round_step`)."""
    size = 4 * 2**20 if kind == "checkpoint" else 2**16
    return np.random.default_rng(r).bytes(size)


def _pretrained(s: int) -> bytes:
    return np.random.default_rng(10_000 + s).bytes(2**20)


def _round_step(kind: str, project: Project) -> int:
    """Write and commit a round as :func:`~napari_ssl_seg.engine.train_round` does
    (reserve, write the arrays, commit the checkpoint and record); returns its number.

    A "checkpoint" round writes no arrays and a large checkpoint: a kill then lands in
    the checkpoint's write about one time in five rather than one in thirty.
    """
    writer = project.begin_round()
    for z in range(SHAPE[0] if kind == "round" else 0):
        block = (slice(z, z + 1),)
        confidence = np.full((1, *SHAPE[1:]), writer.round / 1000, np.float32)
        writer.write(block, _pseudo(writer.round)[block], confidence)
    writer.commit({"method": "kill-test", "kind": kind}, _checkpoint(kind, writer.round))
    return writer.round


# ------------------------------------------------------------------------ the child
def _child(kind: str, path: str, first: int, conn, config=None) -> None:
    """Write ``kind`` in a loop from step ``first``, acknowledging each returned call."""
    from napari_ssl_seg.engine import run_round

    try:
        project = Project.open(path)
        session = AnnotationSession(project, source="kill")
        layer = np.zeros(SHAPE, np.uint16)
        conn.send(("ready", None))
        for s in range(first, 10**9):
            if kind in EDIT_KINDS:
                conn.send(("edit", (s, _edit_step(kind, project, session, layer, s))))
            elif kind == "pretrained":
                project.save_pretrained(PRETRAINED, _pretrained(s))
                conn.send(("pretrained", s))
            elif kind == "training":  # the CLI's train: train, commit, refresh `final`
                conn.send(("round", run_round(project, config)["round"]))
            else:
                conn.send(("round", _round_step(kind, project)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise


# multiprocessing polls every live child from any thread's Process.start(); two threads
# polling one child can both read its exit status pipe and one gets 255. Start, kill and
# join under this lock.
_PROCESSES = threading.Lock()


@pytest.fixture(scope="module")
def fork_server():
    """A multiprocessing context whose children fork from a server that imported us."""
    context = mp.get_context("forkserver")
    # torch._dynamo is what a first optimiser step imports (3 s): once, in the server.
    preload = [__name__, "napari_ssl_seg.engine", "napari_ssl_seg.annotation", "torch._dynamo"]
    context.set_forkserver_preload(preload)
    return context


def _kill_at_random(context, kind, path, first, delay, config=None) -> list[tuple]:
    """Start a child writing ``kind``, SIGKILL it ``delay`` s after it is ready; returns
    the acknowledgements it sent, in order."""
    receive, send = context.Pipe(duplex=False)
    child = context.Process(
        target=_child, args=(kind, str(path), first, send, config), daemon=True
    )
    with _PROCESSES:
        child.start()
    send.close()
    try:
        assert receive.poll(120), "the child never got ready"
        with contextlib.suppress(EOFError):  # died at once: the exit code tells
            what, detail = receive.recv()
            if what == "error":
                pytest.fail(f"the {kind} child failed before it was killed:\n{detail}")
            time.sleep(delay)
    finally:
        with _PROCESSES:  # is_alive: never signal a pid the system may have reused
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
            child.join()
    acks = []
    while True:
        try:
            message = receive.recv()
        except EOFError:
            break
        if message[0] == "error":
            pytest.fail(f"the {kind} child failed before it was killed:\n{message[1]}")
        acks.append(message)
    assert child.exitcode == -signal.SIGKILL, f"the {kind} child exited with {child.exitcode}"
    return acks


def _reopen(path: Path) -> Project:
    project = Project.open(path)  # replays what the killed child left unapplied
    # A lock the dead child left held would make every later write wait this long.
    project.lock_timeout = 5.0
    return project


# ------------------------------------------------------------------------ the checks
def _check_edits(project: Project, kind: str, acked: list[tuple], first: int) -> int:
    """Every acknowledged step is logged and visible, and the log and the arrays agree.

    ``acked``: the killed child's ``(step, edit id)`` acknowledgements; it began at step
    ``first``. Returns the number of steps made.
    """
    edits = project.edits()
    n = len(edits)
    assert [e.id for e in edits] == list(range(1, n + 1)), "edit ids have gaps"
    for s, edit_id in acked:
        assert edit_id == s + 1, f"step {s} was acknowledged as edit {edit_id}"
        assert s < n, f"acknowledged edit {edit_id} is not in the log ({n} edits)"
    last = acked[-1][0] if acked else first - 1
    assert n >= first, f"{n} edits logged; {first} were made before this child"
    assert n <= last + 2, f"{n} edits logged; the child acknowledged up to step {last}"
    for s, edit in enumerate(edits):
        edit_kind, region, _, _ = _plan(kind, s)
        assert (edit.kind, edit.region) == (edit_kind, region), f"edit {edit.id}"
    expected = _expected(kind, n)
    labels, human = project.human_labels()
    np.testing.assert_array_equal(human, expected >= 0, err_msg="which voxels are human")
    np.testing.assert_array_equal(labels, np.maximum(expected, 0), err_msg="human labels")
    # `final` (what export writes) holds every applied edit.
    np.testing.assert_array_equal(project.final[...], project.merged_labels(), err_msg="final")
    return n


def _check_rounds(project: Project, kind: str, acked: list[int]) -> None:
    """Every round ever acknowledged is committed; every committed round is whole."""
    rounds = [record["round"] for record in project.rounds()]
    assert rounds == list(range(1, len(rounds) + 1)), f"rounds {rounds}"
    missing = sorted(set(acked) - set(rounds))
    assert not missing, f"acknowledged rounds {missing} are not committed (rounds {rounds})"
    for r in rounds:
        payload = project.checkpoint_bytes(r)  # checks the recorded sha256
        confidence = np.asarray(project.confidence(r)[...])
        pseudo = np.asarray(project.pseudo_labels(r)[...])
        if kind == "training":
            from napari_ssl_seg.engine import load_round_checkpoint

            load_round_checkpoint(project, r)
            assert pseudo.shape == confidence.shape == project.shape
        else:
            assert payload == _checkpoint(kind, r), f"round {r}'s checkpoint"
            written = kind == "round"  # "checkpoint" rounds leave the fill value
            np.testing.assert_array_equal(pseudo, _pseudo(r) * written, err_msg=f"round {r}")
            np.testing.assert_array_equal(confidence, np.float32(r / 1000) * written)


@contextlib.contextmanager
def _named(kind: str, i: int, delay: float, acks: list[tuple]):
    """Name the kill in a failure (the delays are seeded: a rerun kills at the same times)."""
    try:
        yield
    except Exception as err:
        raise AssertionError(
            f"{kind}: after kill {i} at {delay:.3f} s (last acknowledgements {acks[-3:]}): "
            f"{type(err).__name__}: {err}"
        ) from err


# ---------------------------------------------------------------- 20 kills of a kind
def _kill_edits(context, kind: str, path: Path) -> None:
    _new_project(path, with_round=kind in ("correction", "accept"))
    rng = random.Random(f"{SEED}-{kind}")
    steps, by_children = 0, 0
    for i in range(KILLS):
        delay = rng.uniform(0, MAX_DELAY[kind])
        acks = _kill_at_random(context, kind, path, steps, delay)
        acked = [payload for what, payload in acks if what == "edit"]
        by_children += len(acked)
        with _named(kind, i, delay, acks):
            project = _reopen(path)
            steps = _check_edits(project, kind, acked, steps)
            # A new write: the lock is free and the ids go on from the log.
            session = AnnotationSession(project, source="kill")
            edit_id = _edit_step(kind, project, session, np.zeros(SHAPE, np.uint16), steps)
            assert edit_id == steps + 1
            steps += 1
    _check_edits(Project.open(path), kind, [(steps - 1, steps)], steps - 1)
    assert by_children >= MIN_ACKS, f"{kind}: {by_children} edits acknowledged by {KILLS} children"


def _kill_rounds(context, kind: str, path: Path) -> None:
    _new_project(path, with_round=False)
    rng = random.Random(f"{SEED}-{kind}")
    acked: list[int] = []  # every round acknowledged so far: none may be lost later
    by_children = 0
    for i in range(KILLS):
        delay = rng.uniform(0, MAX_DELAY[kind])
        acks = _kill_at_random(context, kind, path, 0, delay)
        acked += [r for _, r in acks]
        by_children += len(acks)
        with _named(kind, i, delay, acks):
            project = _reopen(path)
            _check_rounds(project, kind, acked)
            # A new round takes the next number: a killed reservation does not keep it.
            r = project.latest_round + 1
            assert _round_step(kind, project) == r
            acked.append(r)
    _check_rounds(Project.open(path), kind, acked)
    assert by_children >= MIN_ACKS, (
        f"{kind}: {by_children} rounds acknowledged by {KILLS} children"
    )


def _kill_pretrained(context, kind: str, path: Path) -> None:
    _new_project(path, with_round=False)
    rng = random.Random(f"{SEED}-{kind}")
    first, by_children = 0, 0  # every step before `first` was acknowledged
    for i in range(KILLS):
        delay = rng.uniform(0, MAX_DELAY[kind])
        acks = _kill_at_random(context, kind, path, first, delay)
        by_children += len(acks)
        last = acks[-1][1] if acks else first - 1
        with _named(kind, i, delay, acks):
            project = _reopen(path)
            # The last weights acknowledged, or those of the save the kill cut short.
            kept = project.load_pretrained(PRETRAINED)  # checks the sha256 beside them
            allowed = [_pretrained(s) for s in (last, last + 1) if s >= 0]
            assert kept in allowed or (last < 0 and kept is None), "pretraining weights lost"
            project.save_pretrained(PRETRAINED, _pretrained(last + 2))
            assert Project.open(path).load_pretrained(PRETRAINED) == _pretrained(last + 2)
            first = last + 3
    assert by_children >= MIN_ACKS, f"{kind}: {by_children} saves acknowledged by {KILLS} children"


def _new_project(path: Path, *, with_round: bool) -> Path:
    image = np.random.default_rng(0).integers(0, 1000, SHAPE).astype(np.uint16)
    project = Project.create(path, image, source="vol.tif")
    if with_round:  # corrections need a round to correct
        writer = project.begin_round()
        writer.write(..., np.ones(SHAPE, np.uint16), np.ones(SHAPE, np.float32))
        writer.commit({"method": "kill-test"}, b"weights")
        project.refresh_final()
    return project.path


# ------------------------------------------------------------------------ the tests
def test_kill_during_every_kind_of_write(tmp_path, fork_server):
    """20 kills per kind; the kinds run side by side, each on its own project."""
    loops = {kind: _kill_edits for kind in EDIT_KINDS}
    loops.update(round=_kill_rounds, checkpoint=_kill_rounds, pretrained=_kill_pretrained)
    with ThreadPoolExecutor(len(loops)) as pool:
        runs = {
            kind: pool.submit(loop, fork_server, kind, tmp_path / f"{kind}.zarr")
            for kind, loop in loops.items()
        }
    failed = {kind: run.exception() for kind, run in runs.items() if run.exception()}
    assert not failed, "\n".join(str(err) for err in failed.values())


@pytest.mark.slow
def test_kill_during_training(tmp_path, fork_server, tiny_config):
    """A real training round (the CLI's ``train``), killed 20 times at random points."""
    from conftest import disks_volume

    image, labels = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image)
    project.annotate_slices(labels, [1, 4], source="test")
    human = project.human_labels()
    path, n_edits = project.path, len(project.edits())
    config = tiny_config()
    # How long a round takes here sets the kills' window (a slow or busy machine, or a
    # heavier round, would otherwise see no round acknowledged): one round uncut first.
    from napari_ssl_seg.engine import run_round

    started = time.monotonic()
    acked: list[int] = [run_round(project, config)["round"]]
    window = max(MAX_DELAY["training"], 2.5 * (time.monotonic() - started))
    rng = random.Random(f"{SEED}-training")
    slice_1 = (slice(1, 2), slice(0, image.shape[1]), slice(0, image.shape[2]))
    for i in range(KILLS):
        delay = rng.uniform(0, window)
        acks = _kill_at_random(fork_server, "training", path, 0, delay, config)
        acked += [r for _, r in acks]
        with _named("training", i, delay, acks):
            project = _reopen(path)
            _check_rounds(project, "training", acked)
            for now, before in zip(project.human_labels(), human, strict=True):
                np.testing.assert_array_equal(now, before)
            # What export writes keeps the human labels, even if the refresh was cut off.
            human_values, human_mask = human
            final = np.asarray(project.final[...])
            np.testing.assert_array_equal(final[human_mask], human_values[human_mask])
            # The next round number and edit id are free.
            writer = project.begin_round()
            assert writer.round == project.latest_round + 1
            writer.abort()
            edit = project.apply_edit("annotation", slice_1, labels[slice_1], whole_slices=True)
            assert edit.id == n_edits + 1
            n_edits += 1
    assert len(acked) - 1 >= MIN_ACKS, f"{len(acked) - 1} rounds acknowledged by {KILLS} children"


def test_plans_differ_step_to_step():
    """The checks can tell the steps apart: consecutive steps write other values."""
    for kind in EDIT_KINDS:
        assert not np.array_equal(_expected(kind, 7), _expected(kind, 8)), kind
    assert _checkpoint("round", 1) != _checkpoint("round", 2)
    assert _pretrained(1) != _pretrained(2)


def test_pretrained_weights_verify_whichever_a_kill_left(tmp_path):
    """Mid-save the digest file vouches for the new and the old weights, not for others."""
    project = Project.open(_new_project(tmp_path / "p.zarr", with_round=False))
    path = project.save_pretrained(PRETRAINED, _pretrained(1))
    digest = path.with_name(path.name + ".sha256")
    old = digest.read_text()
    project.save_pretrained(PRETRAINED, _pretrained(2))
    new = digest.read_text()
    assert new != old and "\n" not in new  # a finished save vouches for its weights only
    digest.write_text(f"{new}\n{old}")  # what a save killed between the two files leaves
    for s in (1, 2):
        path.write_bytes(_pretrained(s))
        assert project.load_pretrained(PRETRAINED) == _pretrained(s)
    path.write_bytes(_pretrained(3))
    with pytest.raises(ProjectError, match="does not match its recorded sha256"):
        project.load_pretrained(PRETRAINED)
