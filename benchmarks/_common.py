"""Helpers shared by the benchmark scripts: sample variants, jobs in child processes, output.

Every measured job runs in its own child process (``python SCRIPT --worker JSON``) so that
its peak resident memory (``ru_maxrss``) is its own, and so that several jobs can run side
by side, each pinned to its own cores (``--jobs N --pin``: laptop-like timings on a
many-core machine). The child prints one JSON line, the last line of its stdout.
"""

from __future__ import annotations

import json
import os
import platform
import queue
import resource
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
VARIANTS = ("clean", "noisy")
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


# ------------------------------------------------------------------------ the sample
def load_variant(variant: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The bundled nuclei sample: ``"clean"`` or ``"noisy"`` (noise seeded by ``seed``).

    Returns
    -------
    image : (60, 256, 256) uint16 ndarray
    truth : (60, 256, 256) uint8 ndarray
        1 inside a nucleus, 0 elsewhere.
    """
    from napari_ssl_seg._sample_data import load_nuclei, noisy_nuclei

    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    image, truth, _ = load_nuclei()
    if variant == "noisy":
        image = noisy_nuclei(seed=seed)
    return image, truth


def unannotated_dice(prediction: np.ndarray, truth: np.ndarray, touched: Sequence[int]) -> float:
    """Foreground Dice over the slices (axis 0) not in ``touched``."""
    from napari_ssl_seg.metrics import dice

    keep = np.setdiff1d(np.arange(truth.shape[0]), np.asarray(list(touched), dtype=int))
    return dice(np.asarray(prediction)[keep], truth[keep])


# ----------------------------------------------------------------------- the machine
def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MB (10**6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6  # bytes vs KiB


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "auto") -> dict:
    """CPU, memory, torch and package versions, git commit: printed with every result."""
    import torch

    from napari_ssl_seg import __version__
    from napari_ssl_seg.engine import pick_device

    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        commit += " (with uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    try:
        torch_device = str(pick_device(device))
    except ValueError as err:
        raise SystemExit(f"--device: {err}") from None
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        memory_gb = float("nan")
    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_device": torch_device,
        "napari_ssl_seg": __version__,
        "git_commit": commit,
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def command_line() -> str:
    """The command that started this script, as a user would type it."""
    return shlex.join(["python", *sys.argv])


def pin_to(cores: Sequence[int], threads: int) -> None:
    """Pin this process to ``cores`` and cap the math libraries at ``threads`` threads.

    Call before importing torch in a child, so its thread pools size themselves to fit.
    """
    if cores and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, set(cores))
    if threads:
        for name in THREAD_VARIABLES:
            os.environ[name] = str(threads)


# ------------------------------------------------------------------------ child jobs
def core_slots(jobs: int, cores_per_job: int, pin: bool) -> list[tuple[int, ...]]:
    """``jobs`` disjoint sets of ``cores_per_job`` usable cores (empty sets without ``pin``)."""
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    if not pin:
        return [()] * jobs
    if not hasattr(os, "sched_getaffinity"):
        raise ValueError("--pin needs os.sched_setaffinity (Linux)")
    usable = sorted(os.sched_getaffinity(0))
    if jobs * cores_per_job > len(usable):
        raise ValueError(
            f"--pin with --jobs {jobs} needs {jobs * cores_per_job} cores "
            f"({cores_per_job} each), only {len(usable)} are usable here"
        )
    return [tuple(usable[i * cores_per_job : (i + 1) * cores_per_job]) for i in range(jobs)]


def run_in_children(
    script: Path,
    jobs: Sequence[dict],
    *,
    parallel: int = 1,
    pin: bool = False,
    cores_per_job: int = 2,
    describe: Callable[[dict], str] = lambda job: json.dumps(job),
    timeout: float | None = None,
    on_result: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run ``python script --worker JSON --cores C`` once per job, ``parallel`` at a time.

    Returns one dict per job, in the order of ``jobs``: what the child printed as its last
    stdout line (JSON), or ``{"error": ...}`` with the end of its stderr when it failed.
    ``on_result`` is called with each result as it finishes (from a pool thread, one at a
    time), so a long run that is killed still leaves what it finished.
    """
    lock = threading.Lock()
    slots: queue.Queue = queue.Queue()
    for slot in core_slots(parallel, cores_per_job, pin):
        slots.put(slot)
    done = [0]
    started = time.time()

    def run_one(job: dict) -> dict:
        cores = slots.get()
        try:
            cmd = [sys.executable, str(script), "--worker", json.dumps(job)]
            if cores:
                cmd += ["--cores", ",".join(map(str, cores))]
            t0 = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            wall = round(time.time() - t0, 2)
        except subprocess.TimeoutExpired:
            proc, wall = None, timeout
        finally:
            slots.put(cores)
        if proc is not None and proc.returncode == 0 and proc.stdout.strip():
            result = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            tail = "timed out" if proc is None else proc.stderr.strip()[-2000:]
            result = {**job, "error": f"exit {getattr(proc, 'returncode', None)}: {tail}"}
        result["process_seconds"] = wall
        result["cores"] = list(cores)
        with lock:
            done[0] += 1
            if on_result is not None:
                on_result(result)
        status = "FAILED " + result["error"].splitlines()[-1][:200] if "error" in result else "ok"
        print(
            f"[{done[0]}/{len(jobs)} {time.time() - started:6.0f}s] {describe(result)} {status}",
            flush=True,
        )
        return result

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        return list(pool.map(run_one, jobs))


def add_variants_argument(parser) -> None:
    """``--variants clean,noisy``: a comma-separated subset of VARIANTS, checked on parsing."""
    import argparse

    def variants(text: str) -> list[str]:
        chosen = [t.strip() for t in text.split(",") if t.strip()]
        bad = [v for v in chosen if v not in VARIANTS]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; allowed: {list(VARIANTS)}")
        return chosen

    parser.add_argument("--variants", type=variants, default=list(VARIANTS))


def worker_arguments(parser) -> None:
    """The hidden options a script's child process is started with."""
    import argparse

    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--cores", help=argparse.SUPPRESS)


def start_worker(args) -> dict:
    """Decode the job, pin the process (before torch is imported); return the job."""
    job = json.loads(args.worker)
    cores = [int(c) for c in args.cores.split(",")] if args.cores else []
    pin_to(cores, job.get("threads") or len(cores))
    return job


def finish_worker(result: dict) -> None:
    """Print the child's result as its last stdout line (with its peak memory)."""
    result["peak_mb"] = round(peak_rss_mb(), 1)
    print(json.dumps(result), flush=True)


# --------------------------------------------------------------------------- output
def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``"0.971 ± 0.004"`` (sample std, ``± 0`` for one value); ``"-"`` for none."""
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return "-"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.{digits}f} ± {std:.{digits}f}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def write_results(
    stem: str, tag: str, payload: dict, markdown: str, out_dir: Path = RESULTS_DIR
) -> tuple[Path, Path]:
    """Write ``<stem>-<tag>.json`` and ``.md`` into ``out_dir`` (atomically); return paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{stem}-{tag}.json", out_dir / f"{stem}-{tag}.md")
    for path, text in zip(paths, (json.dumps(payload, indent=1), markdown), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        os.replace(tmp, path)
    return paths


def machine_markdown(info: dict, command: str) -> str:
    return (
        f"Command: `{command}`\n\n"
        f"Machine: {info['cpu']}, {info['cpu_count']} CPUs ({info['cpus_usable']} usable), "
        f"{info['memory_gb']} GB; torch {info['torch']} on {info['torch_device']}; "
        f"Python {info['python']}; napari-ssl-seg {info['napari_ssl_seg']} "
        f"(git {info['git_commit']}); {info['date']}.\n"
    )


def replace_readme_section(readme: Path, name: str, text: str) -> None:
    """Replace what lies between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    content = readme.read_text()
    if start not in content or end not in content:
        raise ValueError(f"{readme} has no {start} ... {end} section to replace")
    head, rest = content.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{text.strip()}\n{end}{tail}")
