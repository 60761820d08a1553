"""Every method and the baselines on the sample: Dice, seconds per round, peak memory.

For each variant of the bundled nuclei sample (``clean``; ``noisy``: the same volume with
low-photon Poisson and read noise, seeded by the run's seed), each number of annotated
slices (``quickstart_slices(n)``) and each seed, every method trains one round through
the engine (a fresh project in a temporary directory, default settings unless
``--iterations``) and the baselines run: ``random-forest`` (ilastik-style, see
``baselines.py``) and ``otsu``. ``diffusion-no-stage1`` and ``diffusion-stage1`` are
``diffusion`` with ``pretrain_iterations`` 0 and 200, ``diffusion-rounds1`` to
``-rounds3`` without stage 1 and with 1 to 3 pseudo-label rounds. Dice is scored on the
slices no human annotated.

Each job runs in its own child process, so its peak resident memory is its own
(``ru_maxrss``, which includes the ~0.3-0.5 GB of Python, torch and MONAI). The full run,
8 jobs at a time, each pinned to 2 cores (laptop-like timings on a 16-core machine):

    python benchmarks/benchmark.py --jobs 8 --pin --tag full

Writes ``benchmarks/results/benchmark-<tag>.json`` (every job) and ``.md`` (the table and
the issue's targets that this run can check). A quick look:

    python benchmarks/benchmark.py --iterations 3 --seeds 0 --slices 3 \\
        --methods supervised,dtc --variants clean --tag smoke
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    RESULTS_DIR,
    VARIANTS,
    add_variants_argument,
    command_line,
    finish_worker,
    load_variant,
    machine_info,
    machine_markdown,
    mean_std,
    replace_readme_section,
    run_in_children,
    start_worker,
    unannotated_dice,
    verdict,
    worker_arguments,
    write_results,
)

#: ``random-forest-vote`` is the forest followed by the majority vote our rounds apply
#: (``TrainConfig.vote``), to show what that post-processing alone is worth.
BASELINES = ("random-forest", "random-forest-vote", "otsu")
#: Extra rows that are a registered method with some settings changed.
VARIANT_METHODS = {
    # Stage 1 pinned off and on (the default is off since it measured worse; it was on).
    "diffusion-no-stage1": ("diffusion", {"pretrain_iterations": 0}),
    "diffusion-stage1": ("diffusion", {"pretrain_iterations": 200}),
    # Pseudo-label rounds per iteration pinned: 1 (the earlier default), 2 (the default:
    # the top of the methods digest's CPU range) and the paper's 3.
    "diffusion-rounds1": ("diffusion", {"pretrain_iterations": 0, "rounds": 1}),
    "diffusion-rounds2": ("diffusion", {"pretrain_iterations": 0, "rounds": 2}),
    "diffusion-rounds3": ("diffusion", {"pretrain_iterations": 0, "rounds": 3}),
}


def all_methods() -> list[str]:
    from napari_ssl_seg.config import AUTO
    from napari_ssl_seg.methods import method_names

    return [AUTO, *method_names(), *VARIANT_METHODS, *BASELINES]


# ---------------------------------------------------------------------- one job (child)
def run_job(job: dict) -> dict:
    """Train (or run a baseline) on one variant, slice count and seed; score it."""
    from napari_ssl_seg._sample_data import quickstart_slices

    image, truth = load_variant(job["variant"], job["seed"])
    slices = quickstart_slices(job["slices"])
    name = job["method"]
    out = {**job, "annotated": slices}
    if name in ("random-forest", "random-forest-vote"):
        from baselines import random_forest_segment

        pred, seconds = random_forest_segment(
            image, truth, slices, n_jobs=job["threads"] or 2, seed=job["seed"]
        )
        if name == "random-forest-vote":
            from napari_ssl_seg.config import TrainConfig
            from napari_ssl_seg.inference import vote_volume

            started = time.perf_counter()
            window = (TrainConfig().vote,) * 3
            pred = vote_volume(pred, window, num_classes=int(truth.max()) + 1)
            seconds += time.perf_counter() - started
    elif name == "otsu":
        from baselines import otsu_segment

        pred, seconds = otsu_segment(image)
    else:
        from napari_ssl_seg.config import TrainConfig
        from napari_ssl_seg.engine import run_round
        from napari_ssl_seg.store import Project

        method, settings = VARIANT_METHODS.get(name, (name, {}))
        values = {"iterations": job["iterations"]} if job["iterations"] else {}
        config = TrainConfig(
            method=method,
            seed=job["seed"],
            device=job["device"],
            threads=job["threads"],
            settings=settings,
            **values,
        )
        with tempfile.TemporaryDirectory() as tmp:
            project = Project.create(Path(tmp) / "bench.zarr", image)
            project.annotate_slices(truth, slices, source="benchmark")
            record = run_round(project, config)
            pred = np.asarray(project.pseudo_labels(record["round"])[...])
        seconds = record["seconds"]
        out.update(
            trained=record["method"],  # what "auto" picked
            train_seconds=record["train_seconds"],
            iterations_done=record["iterations_done"],
            torch_device=record["device"],
        )
    out.update(dice=round(unannotated_dice(pred, truth, slices), 5), seconds=round(seconds, 2))
    return out


# ----------------------------------------------------------------------------- report
def cell(results: list[dict], **where) -> list[dict]:
    return [r for r in results if "error" not in r and all(r[k] == v for k, v in where.items())]


def dice_mean(results: list[dict], **where) -> float | None:
    rows = cell(results, **where)
    return float(np.mean([r["dice"] for r in rows])) if rows else None


def table(
    results: list[dict],
    methods: Sequence[str],
    variants: Sequence[str],
    slices: Sequence[int],
    default: str,
) -> str:
    """Markdown: rows = methods, columns = variant x slices (mean ± std Dice), s, MB."""
    cols = [(v, n) for v in variants for n in slices]
    head = ["method", *[f"{v}, {n} sl." for v, n in cols], "s / round", "peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        rows = cell(results, method=m)
        label = f"{m} (default)" if m == default else m
        dices = [
            mean_std([r["dice"] for r in cell(results, method=m, variant=v, slices=n)])
            for v, n in cols
        ]
        seconds = f"{np.mean([r['seconds'] for r in rows]):.1f}" if rows else "-"
        peak = f"{max(r['peak_mb'] for r in rows):.0f}" if rows else "-"
        lines.append("| " + " | ".join([label, *dices, seconds, peak]) + " |")
    return "\n".join(lines)


def check_targets(results: list[dict], default: str) -> list[str]:
    """The issue's targets that this run measures, one PASS / FAIL / n/a line each."""
    lines = []
    d = dice_mean(results, method=default, variant="clean", slices=3)
    lines.append(
        f"{verdict(None if d is None else d >= 0.97)}: clean, 3 annotated slices, "
        f"{default} Dice {_fmt(d)} >= 0.97"
    )
    d, rf = (
        dice_mean(results, method=m, variant="noisy", slices=3) for m in (default, "random-forest")
    )
    ok = None if d is None or rf is None else d - rf >= 0.02
    gap = "-" if ok is None else f"{100 * (d - rf):+.1f}"
    lines.append(
        f"{verdict(ok)}: noisy, 3 annotated slices, {default} {_fmt(d)} vs random forest "
        f"{_fmt(rf)}: {gap} Dice points >= +2"
    )
    # "auto" is not a method of its own: it runs supervised or mean-teacher, whose rows count.
    ssl = sorted({r["method"] for r in results} - {"supervised", "auto", *BASELINES})
    for variant in VARIANTS:
        for n in (1, 3):
            sup = dice_mean(results, method="supervised", variant=variant, slices=n)
            scores = {m: dice_mean(results, method=m, variant=variant, slices=n) for m in ssl}
            scores = {m: s for m, s in scores.items() if s is not None}
            best = max(scores, key=scores.get) if scores else None
            ok = None if best is None or sup is None else scores[best] > sup
            lines.append(
                f"{verdict(ok)}: {variant}, {n} annotated slice(s), best SSL method "
                f"{best or '-'} {_fmt(scores.get(best))} > supervised {_fmt(sup)}"
            )
    t, rf = (
        cell(results, method=m, variant="clean", slices=3) for m in (default, "random-forest")
    )
    if t and rf:
        ratio = np.mean([r["seconds"] for r in t]) / np.mean([r["seconds"] for r in rf])
        lines.append(
            f"{verdict(ratio <= 4)}: clean, 3 slices, an engine round of {default} takes "
            f"{ratio:.1f}x the random forest's time (<= 4x; a proxy: round_time.py "
            "times the whole CLI round)"
        )
    return lines


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def report(results: list[dict], args, info: dict, methods: Sequence[str], default: str) -> str:
    failed = [r for r in results if "error" in r]
    pinned = f", each pinned to {args.threads} cores" if args.pin else ""
    setup = (
        f"Mean ± std Dice over seeds {args.seeds} on the slices no human annotated; "
        f"{args.iterations or 'default'} iterations; jobs side by side: {args.jobs}{pinned}; "
        f"torch threads per job: {args.threads or 'all'}. Seconds per round include "
        "loading, stage-1 pretraining where a method has one, training and predicting the "
        "volume; peak MB is the job process's maximum resident memory (each job, the "
        "baselines too, imports torch and MONAI: about 0.4 GB of it).\n"
    )
    text = [
        "# Benchmark: every method on the nuclei sample\n",
        machine_markdown(info, command_line()),
        setup,
        table(results, methods, args.variants, args.slices, default),
        "\nTargets (issue #3) this run can check:\n",
        *[f"- {line}" for line in check_targets(results, default)],
    ]
    if failed:
        text += [
            "\nFailed jobs:\n",
            *[
                f"- {r['method']} {r['variant']} {r['slices']} sl. "
                f"seed {r['seed']}: {r['error'].splitlines()[-1]}"
                for r in failed
            ],
        ]
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    words = lambda text: [t.strip() for t in text.split(",") if t.strip()]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--methods", type=words, help="comma-separated (default: all, baselines included)"
    )
    add_variants_argument(parser)
    parser.add_argument("--slices", type=ints, default=[1, 3, 5], help="annotated slice counts")
    parser.add_argument("--seeds", type=ints, default=[0, 1, 2])
    parser.add_argument(
        "--iterations", type=int, help="training iterations (default: TrainConfig's)"
    )
    parser.add_argument("--device", default="cpu", help="torch device of the engine jobs")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch threads (and RF jobs) per job"
    )
    parser.add_argument("--jobs", type=int, default=1, help="jobs run side by side")
    parser.add_argument(
        "--pin", action="store_true", help="pin each job to its own --threads cores"
    )
    parser.add_argument("--tag", default="local", help="results/benchmark-<tag>.json and .md")
    parser.add_argument(
        "--report-from",
        type=lambda text: [Path(t) for t in text.split(",") if t.strip()],
        help="run nothing: merge these result files (.json of a run, or the .jsonl a run "
        "streams as jobs finish) into one table under --tag",
    )
    parser.add_argument(
        "--readme",
        type=Path,
        help="also put the table between the "
        "<!-- benchmark:start --> and <!-- benchmark:end --> lines of this file",
    )
    worker_arguments(parser)
    args = parser.parse_args(argv)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        finish_worker(run_job(start_worker(args)))
        return 0
    from napari_ssl_seg.config import TrainConfig

    methods = args.methods or all_methods()
    unknown = sorted(set(methods) - set(all_methods()))
    if unknown:
        print(f"unknown method(s) {unknown}; available: {all_methods()}", file=sys.stderr)
        return 2
    default = TrainConfig().method
    if args.report_from:
        return merge_reports(args, methods, default)
    info = machine_info(args.device)
    print(machine_markdown(info, command_line()))
    jobs = [
        {
            "variant": v,
            "slices": n,
            "seed": s,
            "method": m,
            "iterations": args.iterations,
            "device": args.device,
            "threads": args.threads,
        }
        for v in args.variants
        for n in args.slices
        for s in args.seeds
        for m in methods
    ]
    # The diffusion rows take several times longer than the others: start them first so
    # that side-by-side jobs finish together.
    jobs.sort(key=lambda job: not job["method"].startswith("diffusion"))
    describe = lambda r: (  # noqa: E731
        f"{r['method']:20s} {r['variant']} {r['slices']} sl. seed {r['seed']}: "
        + (
            f"Dice {r['dice']:.4f} {r['seconds']:6.1f} s {r['peak_mb']:5.0f} MB"
            if "dice" in r
            else ""
        )
    )
    stream = RESULTS_DIR / f"benchmark-{args.tag}.jsonl"
    stream.parent.mkdir(parents=True, exist_ok=True)
    stream.write_text("")

    def keep(result: dict) -> None:
        with stream.open("a") as f:
            f.write(json.dumps({**result, "machine": info["cpu"]}) + "\n")

    results = run_in_children(
        Path(__file__),
        jobs,
        parallel=args.jobs,
        pin=args.pin,
        cores_per_job=args.threads,
        describe=describe,
        on_result=keep,
    )
    markdown = report(results, args, info, methods, default)
    payload = {
        "command": command_line(),
        "machine": info,
        "arguments": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("worker", "cores")
        },
        "default_method": default,
        "results": results,
    }
    publish(args, payload, markdown)
    return 1 if any("error" in r for r in results) else 0


def publish(args, payload: dict, markdown: str) -> None:
    """Write the results files (and the README section with ``--readme``); print the table."""
    paths = write_results("benchmark", args.tag, payload, markdown)
    if args.readme:
        replace_readme_section(args.readme, "benchmark", markdown.split("\n", 2)[2])
    print("\n" + markdown)
    print("wrote " + ", ".join(map(str, paths)))


def merge_reports(args, methods: Sequence[str], default: str) -> int:
    """Build one table from several runs' result files (e.g. a run split across calls).

    Jobs are keyed by (method, variant, slices, seed): a later file's job replaces an
    earlier file's, so a re-run of some methods updates their rows.
    """
    merged, machines = {}, []
    for path in args.report_from:
        if not path.is_file():
            print(f"--report-from: no such file {path}", file=sys.stderr)
            return 2
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            payload = json.loads(path.read_text())
            rows = payload["results"]
            machines.append(payload["machine"])
        for r in rows:  # a later file's job replaces an earlier one's (a re-run)
            if r["method"] in methods:
                merged[(r["method"], r["variant"], r["slices"], r["seed"])] = r
    results = list(merged.values())
    # Restrict the table to what the files hold.
    for key in ("variants", "slices", "seeds"):
        field = {"variants": "variant", "slices": "slices", "seeds": "seed"}[key]
        setattr(args, key, [x for x in getattr(args, key) if any(r[field] == x for r in results)])
    present = [m for m in methods if any(r["method"] == m for r in results)]
    info = machines[0] if machines else machine_info(args.device)
    markdown = report(results, args, info, present, default)
    sources = ", ".join(str(p) for p in args.report_from)
    markdown = markdown.replace("\n", f"\n\nMerged from: {sources}.\n", 1)
    payload = {
        "command": command_line(),
        "machine": info,
        "default_method": default,
        "sources": sources,
        "results": results,
    }
    publish(args, payload, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
