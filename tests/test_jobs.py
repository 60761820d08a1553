"""TrainingJob: a real child process trains a tiny round, stops early, reports errors."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from napari_ssl_seg.jobs import TrainingJob, error_summary
from napari_ssl_seg.store import Project

TIMEOUT = 120.0  # seconds; spawning a child that imports torch takes a few on 2 cores


def run_to_end(job: TrainingJob, *, on_message=None) -> list[tuple[str, object]]:
    """Poll ``job`` until it reports ``done`` or ``error``; every message, in order."""
    messages: list[tuple[str, object]] = []
    deadline = time.monotonic() + TIMEOUT
    while not job.finished:
        assert time.monotonic() < deadline, f"no result after {TIMEOUT} s: {messages[-3:]}"
        for message in job.poll():
            messages.append(message)
            if on_message is not None:
                on_message(job, message)
        time.sleep(0.05)
    assert job.join(30.0), "the child did not exit after its last message"
    return messages


def test_job_trains_a_round(tiny_project, tiny_config):
    project, _, _ = tiny_project
    job = TrainingJob(project.path, tiny_config(iterations=5))
    job.start()
    messages = run_to_end(job)
    kinds = [kind for kind, _ in messages]
    assert kinds[-1] == "done", messages[-1]
    progress = [payload for kind, payload in messages if kind == "progress"]
    train = [p for p in progress if p["phase"] == "train"]
    assert [p["iteration"] for p in train] == [1, 2, 3, 4, 5]
    assert all("loss" in p["losses"] and p["total"] == 5 for p in train)
    record = messages[-1][1]
    assert record["round"] == 1 and record["iterations_done"] == 5
    assert not record["stopped_early"]
    # The child sized torch and OpenMP to the job's threads before torch loaded, and its
    # idle OpenMP threads sleep (unless the user's environment chose otherwise).
    expected_policy = os.environ.get("OMP_WAIT_POLICY", "PASSIVE")
    assert record["runtime"] == {
        "torch_threads": job.threads,
        "omp_num_threads": str(job.threads),
        "omp_wait_policy": expected_policy,
    }
    # The child committed the round; the parent's Project sees it.
    assert project.latest_round == 1
    assert project.pseudo_labels(1).shape == project.shape
    # The child leaves the merged labels to the parent: refreshing them is our job.
    project.refresh_final()
    np.testing.assert_array_equal(project.final[...], project.merged_labels())
    assert not job.is_running and job.exitcode == 0 and job.result == record


def test_stop_ends_early_and_still_commits(tiny_project, tiny_config):
    project, _, _ = tiny_project
    job = TrainingJob(project.path, tiny_config(iterations=100_000))

    def stop_after_two(job, message):
        kind, payload = message
        if kind == "progress" and payload["phase"] == "train" and payload["iteration"] >= 2:
            job.stop()

    job.start()
    messages = run_to_end(job, on_message=stop_after_two)
    assert messages[-1][0] == "done", messages[-1]
    record = messages[-1][1]
    assert record["stopped_early"] and 2 <= record["iterations_done"] < 100_000
    assert project.latest_round == 1 and job.stop_requested


def test_error_comes_back_as_a_message(tmp_path, tiny_config):
    image = np.random.default_rng(0).integers(0, 500, (4, 32, 32)).astype(np.uint16)
    project = Project.create(tmp_path / "empty.zarr", image)  # nothing annotated
    job = TrainingJob(project.path, tiny_config())
    job.start()
    messages = run_to_end(job)
    kind, text = messages[-1]
    assert kind == "error"
    assert "Traceback" in text and "no slice is annotated" in error_summary(text)
    assert job.error == text and project.latest_round == 0


def test_kill_reports_an_error(tiny_project, tiny_config):
    project, _, _ = tiny_project
    job = TrainingJob(project.path, tiny_config(iterations=100_000))
    job.start()
    job.kill()
    messages = run_to_end(job)
    assert messages[-1][0] == "error" and "ended without a result" in messages[-1][1]
    assert project.latest_round == 0


def test_error_summary():
    text = "Traceback (most recent call last):\n  File x\nValueError: bad thing\n\n"
    assert error_summary(text) == "ValueError: bad thing"
    assert error_summary("") == "unknown error"


def test_bad_inputs(tiny_project, tiny_config, tmp_path):
    project, _, _ = tiny_project
    with pytest.raises(TypeError, match="config must be a TrainConfig, got dict"):
        TrainingJob(project.path, {"iterations": 3})
    with pytest.raises(FileNotFoundError, match="is not a project directory"):
        TrainingJob(tmp_path / "missing.zarr", tiny_config())
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        TrainingJob(project.path, tiny_config(), threads=0)
    job = TrainingJob(project.path, tiny_config())
    assert job.poll() == [] and job.join(0.1) and not job.is_running
    job.start()
    with pytest.raises(RuntimeError, match="started already"):
        job.start()
    job.kill()
