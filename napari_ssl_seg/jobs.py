"""A training round in a child process, reported through a queue.

Headless: no Qt, no napari. The widget starts a :class:`TrainingJob` and polls it from a
timer on the GUI thread; the CLI could do the same from a loop. Training runs in a
*spawned* process (not a thread): torch's CPU kernels then never hold the GUI's
interpreter lock, the child's threads and priority are its own, and a hung or crashed
round can be killed without taking the viewer down.

Messages
--------
:meth:`TrainingJob.poll` returns ``(kind, payload)`` tuples, oldest first:

``("progress", dict)``
    Each progress dict that :func:`napari_ssl_seg.engine.train_round` yields (``phase``,
    ``iteration``, ``total``, ``elapsed``, ``remaining``, ``losses``).
``("done", dict)``
    The committed round record; always the last message of a round that finished,
    including one stopped early with :meth:`TrainingJob.stop`.
``("error", str)``
    The child's traceback (its last line is the message, see :func:`error_summary`), or
    a note that the process died without reporting (killed, out of memory). Last too.

Ownership: the child opens the project with ``recover=False`` and trains with
``refresh_final=False``, so it writes only the new round's arrays and record. The parent
(the process that records human edits) stays the only writer of human labels and of the
merged ``final`` labels, and calls :meth:`Project.refresh_final` when ``done`` arrives.
The child holds the project's writer lock only to reserve its round number and to commit
the round (see :meth:`Project.begin_round`), so the parent's edits are not held up while
it trains.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module
import time
import traceback
from pathlib import Path

from napari_ssl_seg.config import TrainConfig

__all__ = ["TrainingJob", "default_threads", "error_summary"]

#: Niceness added to the child: the GUI (and the annotator's brush) wins the CPU.
CHILD_NICENESS = 10


def default_threads() -> int:
    """torch CPU threads for a child: every core. The child runs at a lower priority
    (``CHILD_NICENESS``), so the GUI still gets a core the moment it needs one; keeping
    a core idle instead made prediction twice as slow on a 2-core laptop."""
    return max(1, os.cpu_count() or 1)


def error_summary(message: str) -> str:
    """The last non-empty line of a traceback: the exception and its message."""
    lines = [line for line in str(message).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


class TrainingJob:
    """One training round of a project, run in a spawned child process.

    Parameters
    ----------
    project_path : path-like
        An existing project directory (see :class:`napari_ssl_seg.store.Project`).
    config : TrainConfig
        The round's settings; sent to the child as a plain dict.
    threads : int, optional
        torch CPU threads in the child; default ``config.threads`` or, when that is 0,
        :func:`default_threads`.
    niceness : int
        Added to the child's scheduling niceness (POSIX only; 0 leaves it alone).

    Examples
    --------
    >>> job = TrainingJob("cells.ssl.zarr", TrainConfig(iterations=50))  # doctest: +SKIP
    >>> job.start()                                                       # doctest: +SKIP
    >>> while job.is_running or not job.finished:                         # doctest: +SKIP
    ...     for kind, payload in job.poll():
    ...         print(kind, payload)
    ...     time.sleep(0.1)
    """

    def __init__(
        self,
        project_path: str | os.PathLike,
        config: TrainConfig,
        *,
        threads: int | None = None,
        niceness: int = CHILD_NICENESS,
    ) -> None:
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        path = Path(project_path)
        if not path.is_dir():
            raise FileNotFoundError(f"project_path {str(path)!r} is not a project directory")
        threads = threads if threads is not None else (config.threads or default_threads())
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.project_path = path
        self.config = config
        self.threads = threads
        self.niceness = int(niceness)
        self.result: dict | None = None
        self.error: str | None = None
        self._context = mp.get_context("spawn")
        self._stop = self._context.Event()
        self._queue = self._context.Queue()
        self._process: mp.process.BaseProcess | None = None
        self._pending: list[tuple[str, object]] = []
        self._finished = False

    # ----------------------------------------------------------------- control
    def start(self) -> None:
        """Spawn the child; returns at once (the child needs a few seconds to import torch)."""
        if self._process is not None:
            raise RuntimeError("this TrainingJob was started already; make a new one")
        self._process = self._context.Process(
            target=_child_main,
            args=(
                str(self.project_path),
                self.config.to_dict(),
                self.threads,
                self.niceness,
                self._stop,
                self._queue,
            ),
            name=f"napari-ssl-seg training {self.project_path.name}",
            daemon=True,  # never outlives the GUI process
        )
        self._process.start()

    def stop(self) -> None:
        """Ask the child to stop training at the next iteration.

        The weights so far are kept and the round is still predicted and committed, so a
        ``("done", record)`` message with ``record["stopped_early"]`` follows.
        """
        self._stop.set()

    def kill(self) -> None:
        """End the child now (SIGTERM, then SIGKILL). A round not yet committed is lost;
        the project stays consistent (a round exists only once its record is written)."""
        process = self._process
        if process is None or not process.is_alive():
            return
        process.terminate()
        process.join(1.0)
        if process.is_alive():
            process.kill()
            process.join(1.0)

    def join(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the child to end; True if it has.

        Messages keep being read meanwhile (a child blocks on exit until its queue is
        drained); :meth:`poll` returns them afterwards.
        """
        if self._process is None:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._process.is_alive():
            self._pending.extend(self._drain())
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._process.join(0.05 if left is None else min(0.05, left))
        return not self._process.is_alive()

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop, wait up to ``timeout`` seconds, then kill. True if it ended by itself."""
        self.stop()
        clean = self.join(timeout)
        if not clean:
            self.kill()
        return clean

    # ---------------------------------------------------------------- messages
    def poll(self) -> list[tuple[str, object]]:
        """Messages that arrived since the last call, oldest first; never blocks long.

        When the child has ended without a ``done`` or ``error`` message (killed, out of
        memory), an ``("error", ...)`` message saying so is made up here.
        """
        messages, self._pending = self._pending + self._drain(), []
        process = self._process

        def ended() -> bool:
            return self._finished or any(kind in ("done", "error") for kind, _ in messages)

        if not ended() and process is not None and not process.is_alive():
            # Whatever the child flushed before exiting is in the pipe already.
            messages.extend(self._drain(wait=0.2))
            if not ended():
                messages.append(
                    (
                        "error",
                        (
                            f"the training process ended without a result (exit code "
                            f"{process.exitcode}); it was killed or ran out of memory"
                        ),
                    )
                )
        for kind, payload in messages:
            if kind == "done":
                self.result, self._finished = payload, True
            elif kind == "error":
                self.error, self._finished = payload, True
        return messages

    def _drain(self, wait: float = 0.0) -> list[tuple[str, object]]:
        out = []
        while True:
            try:
                out.append(self._queue.get(timeout=wait) if wait else self._queue.get_nowait())
            except (queue_module.Empty, EOFError, OSError):
                return out

    # -------------------------------------------------------------- properties
    @property
    def is_running(self) -> bool:
        """True while the child process is alive."""
        return self._process is not None and self._process.is_alive()

    @property
    def finished(self) -> bool:
        """True once ``done`` or ``error`` was returned by :meth:`poll`."""
        return self._finished

    @property
    def stop_requested(self) -> bool:
        return self._stop.is_set()

    @property
    def exitcode(self) -> int | None:
        return None if self._process is None else self._process.exitcode


def _child_main(path, config_dict, threads, niceness, stop_event, queue) -> None:
    """Entry point of the child: train one round, report through ``queue``."""
    try:
        if niceness and hasattr(os, "nice"):
            os.nice(niceness)
        # Before torch loads, so that OpenMP sizes its pool to the same number, and (unless
        # the user chose) its idle threads sleep instead of spinning: two torch processes
        # on 2 cores (a CLI run beside this child), 2 threads each, took 381 s each
        # spinning and 33 s each sleeping, same Dice. The CLI keeps OpenMP's default:
        # alone, sleeping threads may cost ~5 % (16.1-17.2 s vs 14.9-16.6 s to train).
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch

        from napari_ssl_seg.engine import train_round
        from napari_ssl_seg.store import Project

        torch.set_num_threads(threads)
        # verify=False: the parent opened (and verified) the project already.
        project = Project.open(path, recover=False, verify=False)
        config = TrainConfig.from_dict(config_dict)
        rounds = train_round(project, config, should_stop=stop_event.is_set, refresh_final=False)
        while True:
            try:
                report = next(rounds)
            except StopIteration as finished:
                record = finished.value
                break
            queue.put(("progress", report))
        queue.put(("done", record))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent
        queue.put(("error", traceback.format_exc()))
