"""Simulated annotator: do corrections chosen by our uncertainty ranking beat random ones?

On each variant of the nuclei sample and each seed: ``--annotated`` annotated slices
(``quickstart_slices(n)``, default 3), round 1; then ``--rounds`` times: correct ``--per-round``
slices from the ground truth (as a person would paint them) and retrain. The slices are
chosen either by the round's uncertainty ranking (``record["uncertain_slices"]``, most
uncertain first, skipping slices already annotated or corrected) or uniformly at random
(seeded) among the untouched slices. Round 1 is trained once and its project copied, so
both strategies start from the same model.

Scoring. The headline ("common") is the Dice of each round's pseudo-labels on the slices
that neither strategy ever annotated or corrected: the same voxels for every round and
both strategies. Scoring each strategy on its own untouched slices ("own", also saved)
would favour the uncertainty strategy, which removes the hardest slices from its own test
set; "merged" is the Dice of what a user would export after the round (corrections and
annotations over pseudo-labels) on every slice but the annotated ones, where the
corrected slices count as right. With the default method ("auto") round 1 from one
annotated slice is a diffusion round and the retrain rounds supervised ones.

    python benchmarks/annotator_curve.py --jobs 6 --pin --tag full

Writes ``benchmarks/results/annotator-curve-<tag>.json`` and ``.md``. A quick look:

    python benchmarks/annotator_curve.py --iterations 3 --rounds 1 --seeds 0 \\
        --variants clean --tag smoke
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    add_variants_argument,
    command_line,
    finish_worker,
    load_variant,
    machine_info,
    machine_markdown,
    mean_std,
    run_in_children,
    start_worker,
    unannotated_dice,
    verdict,
    worker_arguments,
    write_results,
)

STRATEGIES = ("uncertainty", "random")


def choose_slices(
    strategy: str, record: dict, touched: set[int], n: int, n_slices: int, rng: np.random.Generator
) -> list[int]:
    """The ``n`` slices a simulated annotator corrects after the round ``record``."""
    free = [i for i in range(n_slices) if i not in touched]
    if strategy == "uncertainty":
        ranked = [s["slice"] for s in record["uncertain_slices"] if s["slice"] not in touched]
        if len(ranked) >= n:
            return ranked[:n]
        # The record keeps only the top 10: top up at random (never happens with 2 per round).
        rest = [i for i in free if i not in ranked]
        return ranked + [int(i) for i in rng.choice(rest, size=n - len(ranked), replace=False)]
    return sorted(int(i) for i in rng.choice(free, size=n, replace=False))


# ---------------------------------------------------------------------- one job (child)
def correct_and_retrain(
    project,
    strategy: str,
    record1: dict,
    truth: np.ndarray,
    annotated: list[int],
    config,
    job: dict,
) -> dict:
    """After round 1, ``job["rounds"]`` times: correct slices chosen by ``strategy``, retrain."""
    from napari_ssl_seg.engine import run_round

    rng = np.random.default_rng(job["seed"])
    record, touched, picks, rounds = record1, set(annotated), [], [record1]
    merged = [unannotated_dice(project.merged_labels(1), truth, annotated)]
    for _ in range(job["rounds"]):
        pick = choose_slices(strategy, record, touched, job["per_round"], truth.shape[0], rng)
        project.correct_slices(truth, pick, source=f"benchmark: simulated annotator, {strategy}")
        touched |= set(pick)
        picks.append(pick)
        record = run_round(project, config)
        rounds.append(record)
        # What the user would export now (later corrections must not count yet).
        merged.append(unannotated_dice(project.merged_labels(record["round"]), truth, annotated))
    return {
        "picks": picks,
        "pseudo": [np.asarray(project.pseudo_labels(r["round"])[...]) for r in rounds],
        "merged": merged,
        "seconds": [r["seconds"] for r in rounds],
        "methods": [r["method"] for r in rounds],  # what "auto" picked per round
    }


def run_curve(job: dict) -> dict:
    """Both strategies on one variant and seed; Dice of every round, three ways."""
    from napari_ssl_seg._sample_data import quickstart_slices
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import run_round
    from napari_ssl_seg.store import Project

    image, truth = load_variant(job["variant"], job["seed"])
    annotated = quickstart_slices(job["annotated"])
    values = {k: job[k] for k in ("method", "iterations") if job[k]}
    config = TrainConfig(seed=job["seed"], device=job["device"], threads=job["threads"], **values)
    with tempfile.TemporaryDirectory() as tmp:
        first = Project.create(Path(tmp) / "uncertainty.zarr", image)
        first.annotate_slices(truth, annotated, source="benchmark")
        record1 = run_round(first, config)
        # Both strategies continue from the same round 1.
        shutil.copytree(first.path, Path(tmp) / "random.zarr")
        projects = {"uncertainty": first, "random": Project.open(Path(tmp) / "random.zarr")}
        runs = {
            strategy: correct_and_retrain(
                project, strategy, record1, truth, annotated, config, job
            )
            for strategy, project in projects.items()
        }
    common = set(annotated).union(*(p for run in runs.values() for p in run["picks"]))
    out = {
        **job,
        "method": config.method,
        "annotated": annotated,
        "common_slices_scored": truth.shape[0] - len(common),
    }
    for strategy, run in runs.items():
        own = [set(annotated).union(*run["picks"][:k]) for k in range(len(run["pseudo"]))]
        out[strategy] = {
            "corrected": run["picks"],
            "dice_common": [round(unannotated_dice(p, truth, common), 5) for p in run["pseudo"]],
            "dice_own": [
                round(unannotated_dice(p, truth, o), 5)
                for p, o in zip(run["pseudo"], own, strict=True)
            ],
            "dice_merged": [round(d, 5) for d in run["merged"]],
            "seconds": run["seconds"],
            "methods": run["methods"],
        }
    return out


# ----------------------------------------------------------------------------- report
def curve_table(results: list[dict], variants: Sequence[str], rounds: int, key: str) -> str:
    head = ["variant", "strategy", *[f"round {r + 1}" for r in range(rounds + 1)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in variants:
        rows = [r for r in results if r["variant"] == v and "error" not in r]
        for s in STRATEGIES:
            cells = [mean_std([r[s][key][k] for r in rows]) for k in range(rounds + 1)]
            lines.append("| " + " | ".join([v, s, *cells]) + " |")
    return "\n".join(lines)


def check_target(results: list[dict], variants: Sequence[str]) -> list[str]:
    """Uncertainty-chosen corrections beat random ones after the last round."""
    lines = []
    for v in variants:
        rows = [r for r in results if r["variant"] == v and "error" not in r]
        if not rows:
            lines.append(f"n/a: {v}: no finished run")
            continue
        u, r = (float(np.mean([row[s]["dice_common"][-1] for row in rows])) for s in STRATEGIES)
        lines.append(
            f"{verdict(u > r)}: {v}, after the last round, uncertainty {u:.4f} > random "
            f"{r:.4f} (common slices, mean over {len(rows)} seed(s))"
        )
    return lines


def report(results: list[dict], args, info: dict) -> str:
    method = next((r["method"] for r in results if "method" in r), "?")
    setup = (
        f"Method {method}, {args.iterations or 'default'} iterations per round, "
        f"{args.annotated} annotated slice(s), {args.per_round} slices corrected from the "
        f"ground truth before each of {args.rounds} retrain rounds; mean ± std over seeds "
        f"{args.seeds}.\n"
    )
    common = (
        "Dice of each round's pseudo-labels on the slices no strategy annotated or corrected "
        "(the same slices for every cell):\n"
    )
    merged = (
        "\nDice of the merged labels a user would export after the round (corrected slices "
        f"count as right), on every slice but the {args.annotated} annotated:\n"
    )
    parts = [
        "# Simulated annotator: uncertainty-chosen against random corrections\n",
        machine_markdown(info, command_line()),
        setup,
        common,
        curve_table(results, args.variants, args.rounds, "dice_common"),
        merged,
        curve_table(results, args.variants, args.rounds, "dice_merged"),
        "\nTarget (issue #3):\n",
        *[f"- {line}" for line in check_target(results, args.variants)],
    ]
    failed = [r for r in results if "error" in r]
    if failed:
        parts += [
            "\nFailed jobs:\n",
            *[f"- {r['variant']} seed {r['seed']}: {r['error'].splitlines()[-1]}" for r in failed],
        ]
    return "\n".join(parts) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_variants_argument(parser)
    parser.add_argument("--seeds", type=ints, default=[0, 1, 2])
    parser.add_argument("--annotated", type=int, default=3, help="annotated slices before round 1")
    parser.add_argument("--rounds", type=int, default=3, help="retrain rounds after round 1")
    parser.add_argument("--per-round", type=int, default=2, help="slices corrected per round")
    parser.add_argument("--method", help="default: TrainConfig's")
    parser.add_argument("--iterations", type=int, help="per round (default: TrainConfig's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per job")
    parser.add_argument("--jobs", type=int, default=1, help="(variant, seed) jobs side by side")
    parser.add_argument(
        "--pin", action="store_true", help="pin each job to its own --threads cores"
    )
    parser.add_argument("--tag", default="local")
    worker_arguments(parser)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.per_round < 1:
        parser.error(
            f"--rounds and --per-round must be >= 1, got {args.rounds} and {args.per_round}"
        )
    if args.annotated < 1:
        parser.error(f"--annotated must be >= 1, got {args.annotated}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        finish_worker(run_curve(start_worker(args)))
        return 0
    info = machine_info(args.device)
    print(machine_markdown(info, command_line()))
    jobs = [
        {
            "variant": v,
            "seed": s,
            "rounds": args.rounds,
            "per_round": args.per_round,
            "annotated": args.annotated,
            "method": args.method,
            "iterations": args.iterations,
            "device": args.device,
            "threads": args.threads,
        }
        for v in args.variants
        for s in args.seeds
    ]

    def describe(r: dict) -> str:
        if "error" in r:
            return f"{r['variant']} seed {r['seed']}:"
        curves = (f"{s} " + " ".join(f"{d:.3f}" for d in r[s]["dice_common"]) for s in STRATEGIES)
        return f"{r['variant']} seed {r['seed']}: " + " | ".join(curves)

    results = run_in_children(
        Path(__file__),
        jobs,
        parallel=args.jobs,
        pin=args.pin,
        cores_per_job=args.threads,
        describe=describe,
    )
    markdown = report(results, args, info)
    payload = {
        "command": command_line(),
        "machine": info,
        "arguments": {k: v for k, v in vars(args).items() if k not in ("worker", "cores")},
        "results": results,
    }
    paths = write_results("annotator-curve", args.tag, payload, markdown)
    print("\n" + markdown)
    print("wrote " + ", ".join(map(str, paths)))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
