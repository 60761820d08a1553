"""The development suite: the default round against the pixel forest on every case.

Each case of ``dev_cases.py`` (tasks made from the bundled sample that stress what the
sample does not) is written to TIFF files and run through the CLI contract in
subprocesses, exactly as a user or the outside evaluation would:

    napari-ssl-seg init P --image image.tif --labels labels.tif --annotated-slices ... --axis A
    napari-ssl-seg train P            # default settings (plus --seed for seeds other than 0)
    napari-ssl-seg export P --out prediction.tif

and the random forest (``baselines.random_forest_segment``: scikit-image
``multiscale_basic_features`` sigma 1-16, 50 trees of depth <= 10) is trained on the same
annotated slices in the same run. Dice per foreground class, pooled over every slice no
human labelled (empty ones included), averaged over the classes. "default s" is the wall
time of the three CLI calls (interpreter start included), "forest s" that of features,
fitting and prediction. One case at a time, so the two never share the cores.

    python benchmarks/dev_suite.py --tag laptop --docs docs/benchmarks.md
    python benchmarks/dev_suite.py --quick --cases sample-3,tiny-2      # a smoke test
    python benchmarks/dev_suite.py --report-from benchmarks/results/dev-suite-laptop.jsonl

Writes ``benchmarks/results/dev-suite-<tag>.md`` and ``.json`` with ``--tag``, and the
table into the ``dev-suite`` section of the file given to ``--docs``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from _common import (
    REPO,
    RESULTS_DIR,
    THREAD_VARIABLES,
    command_line,
    machine_info,
    machine_markdown,
    mean_std,
    replace_readme_section,
    write_results,
)
from dev_cases import CASES, Case, make_case

#: The forest of the outside evaluation: 50 trees of depth <= 10 on sigma 1-16 features.
FOREST = {"n_estimators": 50, "max_depth": 10}
#: ``--quick``: a few iterations and a few small trees, to see that everything runs.
QUICK_ITERATIONS = 3
QUICK_FOREST = {"n_estimators": 5, "max_depth": 6, "samples_per_slice": 2000}


# ------------------------------------------------------------------------- scoring
def unlabelled_dice(prediction: np.ndarray, case: Case) -> dict[int, float]:
    """Dice of each class of ``case`` over the slices (along its axis) nobody labelled.

    A class absent from both the prediction and the truth there scores 1.0.
    """
    keep = np.setdiff1d(np.arange(case.truth.shape[case.axis]), case.annotated)
    pred = np.take(np.asarray(prediction), keep, axis=case.axis)
    truth = np.take(case.truth, keep, axis=case.axis)
    out = {}
    for c in case.classes:
        p, t = pred == c, truth == c
        total = int(p.sum()) + int(t.sum())
        out[c] = 1.0 if total == 0 else 2.0 * int((p & t).sum()) / total
    return out


# ----------------------------------------------------------------------- the two runs
def write_inputs(case: Case, folder: Path) -> tuple[Path, Path]:
    """The image (ImageJ TIFF with its voxel size) and the labels of the annotated slices."""
    import tifffile

    from napari_ssl_seg.io import write_labels

    image_path, labels_path = folder / "image.tif", folder / "labels.tif"
    z, y, x = case.voxel_size
    tifffile.imwrite(
        image_path,
        case.image,
        imagej=True,
        resolution=(1 / x, 1 / y),
        metadata={"axes": "ZYX", "spacing": z, "unit": "micron"},
    )
    sparse = np.zeros_like(case.truth)
    index = [slice(None)] * 3
    index[case.axis] = case.annotated
    sparse[tuple(index)] = case.truth[tuple(index)]
    write_labels(labels_path, sparse, voxel_size=case.voxel_size)
    return image_path, labels_path


def run_default(case: Case, folder: Path, *, seed: int, quick: bool, env: dict) -> dict:
    """init, train (defaults), export through the CLI; score the exported labels."""
    from napari_ssl_seg.io import read_volume

    image, labels = write_inputs(case, folder)
    project, out = folder / "project.zarr", folder / "prediction.tif"
    slices = ",".join(map(str, case.annotated))
    train = ["train", str(project), "--quiet"]
    train += ["--seed", str(seed)] if seed else []
    train += ["--iterations", str(QUICK_ITERATIONS)] if quick else []
    steps = [
        ["init", str(project), "--image", str(image), "--labels", str(labels)]
        + ["--annotated-slices", slices, "--axis", str(case.axis)],
        train,
        ["export", str(project), "--out", str(out)],
    ]
    started, printed = time.perf_counter(), {}
    for step in steps:
        cmd = [sys.executable, "-m", "napari_ssl_seg.cli", *step]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"{step[0]} exited {proc.returncode}: {proc.stderr.strip()}")
        printed[step[0]] = proc.stdout
    seconds = time.perf_counter() - started
    # "round 1 (supervised, 180 iterations, 17.2 s)": the method auto ran.
    first = printed["train"].splitlines()[0]
    method = first.split("(", 1)[1].split(",", 1)[0] if "(" in first else "?"
    # "  wrote ensemble+vote: best held-out Dice ...": what a validated round wrote.
    wrote = [
        line.split()[1].rstrip(":")
        for line in printed["train"].splitlines()
        if line.strip().startswith("wrote ")
    ]
    method += f" -> {wrote[0]}" if wrote else ""
    dice = unlabelled_dice(read_volume(out).data, case)
    return {"dice": dice, "seconds": seconds, "method": method, "train_line": first}


def run_forest(case: Case, *, seed: int, quick: bool, n_jobs: int) -> dict:
    """The random forest on the same annotated slices (slices moved to axis 0 for it)."""
    from baselines import random_forest_segment

    image = np.moveaxis(case.image, case.axis, 0)
    truth = np.moveaxis(case.truth, case.axis, 0)
    settings = QUICK_FOREST if quick else FOREST
    pred, seconds = random_forest_segment(
        image, truth, case.annotated, n_jobs=n_jobs, seed=seed, **settings
    )
    dice = unlabelled_dice(np.moveaxis(pred, 0, case.axis), case)
    return {"dice": dice, "seconds": seconds}


def attempt(run) -> dict:
    """``run()``'s result with the Dice averaged over classes, or the error it raised."""
    try:
        result = run()
    except Exception as err:  # one failed run must not lose the others
        return {"error": f"{type(err).__name__}: {err}"[-2000:]}
    result["per_class"] = {str(c): round(d, 5) for c, d in result["dice"].items()}
    result["dice"] = round(float(np.mean(list(result["dice"].values()))), 5)
    result["seconds"] = round(result["seconds"], 2)
    return result


def run_case(name: str, seed: int, args) -> dict:
    """Build one case, run the default round and the forest on it; one result row."""
    case = make_case(name, seed)
    row = {
        "case": name,
        "seed": seed,
        "what": case.what,
        "annotated": case.annotated,
        "axis": case.axis,
        "shape": list(case.image.shape),
        "voxel_size": list(case.voxel_size),
        "classes": case.classes,
    }
    # The children import the package from this checkout, whatever is installed.
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    if args.threads:
        env.update({var: str(args.threads) for var in THREAD_VARIABLES})
    with tempfile.TemporaryDirectory(prefix=f"dev-suite-{name}-") as folder:
        row["default"] = attempt(
            lambda: run_default(case, Path(folder), seed=seed, quick=args.quick, env=env)
        )
    row["forest"] = attempt(
        lambda: run_forest(case, seed=seed, quick=args.quick, n_jobs=args.n_jobs)
    )
    return row


# --------------------------------------------------------------------------- report
def _cell(rows: list[dict], key: str, field: str) -> list[float]:
    return [r[key][field] for r in rows if field in r[key]]


def _dice(values: list[float]) -> str:
    if len(values) > 1:
        return mean_std(values)
    return f"{values[0]:.3f}" if values else "failed"


def table(rows: list[dict], cases: Sequence[str]) -> tuple[str, list[str]]:
    """The markdown table (one line per case, seeds averaged) and the cases the default
    loses, each as ``"case (-x.x)"``."""
    head = "| case | default Dice | forest Dice | default s | forest s | delta | auto ran |"
    lines, losses = [head, "|---|---|---|---|---|---|---|"], []
    for name in cases:
        mine = [r for r in rows if r["case"] == name]
        d, f = _cell(mine, "default", "dice"), _cell(mine, "forest", "dice")
        ds, fs = _cell(mine, "default", "seconds"), _cell(mine, "forest", "seconds")
        delta = "-"
        if d and f:
            points = 100 * (np.mean(d) - np.mean(f))
            delta = f"{points:+.2f}"
            if points < 0:
                losses.append(f"{name} ({delta})")
        ran = sorted({r["default"]["method"] for r in mine if "method" in r["default"]})
        seconds = [f"{np.mean(s):.1f}" if s else "-" for s in (ds, fs)]
        lines.append(
            f"| {name} | {_dice(d)} | {_dice(f)} | {seconds[0]} | {seconds[1]} | {delta} "
            f"| {', '.join(ran) or '-'} |"
        )
    return "\n".join(lines), losses


def report(rows: list[dict], cases: Sequence[str], args, info: dict) -> str:
    """The results file: machine, command, table, per-class Dice, the cases, failures."""
    body, losses = table(rows, cases)
    forest = QUICK_FOREST if args.quick else FOREST
    setup = (
        f"Seeds {args.seeds}; default settings"
        + (f" except {QUICK_ITERATIONS} iterations (--quick)" if args.quick else "")
        + f"; forest {forest}, n_jobs {args.n_jobs}; "
        f"math-library threads per child: {args.threads or 'unset (all cores)'}. Dice per "
        "foreground class pooled over every slice no human labelled (empty ones included), "
        "averaged over the classes; delta = default - forest in Dice points.\n"
    )
    text = [machine_markdown(info, command_line()), setup]
    if args.note:
        text.append(f"Note: {args.note}\n")
    text.append(body)
    won = len(cases) - len(losses)
    text.append(
        f"\nThe default is at or above the forest on {won} of {len(cases)} cases"
        + (f"; it loses on {', '.join(losses)}." if losses else ".")
    )
    multi = [r for r in rows if len(r["classes"]) > 1]
    if multi:
        text.append("\nPer class (seed, class: default / forest):\n")
        for r in multi:
            parts = [
                f"class {c}: {r['default'].get('per_class', {}).get(str(c), '-')} / "
                f"{r['forest'].get('per_class', {}).get(str(c), '-')}"
                for c in r["classes"]
            ]
            text.append(f"- {r['case']} seed {r['seed']}: " + "; ".join(parts))
    text.append("\nThe cases (annotated slices along the annotation axis):\n")
    for name in cases:
        r = next(r for r in rows if r["case"] == name)
        text.append(
            f"- `{name}`: {r['what']}; shape {tuple(r['shape'])}, axis {r['axis']}, "
            f"slices {r['annotated']}"
        )
    failed = [(r, k) for r in rows for k in ("default", "forest") if "error" in r[k]]
    if failed:
        text.append("\nFailed runs:\n")
        for r, k in failed:
            last = r[k]["error"].strip().splitlines()[-1]
            text.append(f"- {r['case']} seed {r['seed']} {k}: {last}")
    return "\n".join(text) + "\n"


# ------------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    def cases(text: str) -> list[str]:
        chosen = [t.strip() for t in text.split(",") if t.strip()]
        bad = [c for c in chosen if c not in CASES]
        if bad or not chosen:
            raise argparse.ArgumentTypeError(f"unknown {bad or text!r}; allowed: {list(CASES)}")
        return chosen

    ints = lambda text: [int(t) for t in text.split(",")]  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=cases, default=list(CASES), help="comma-separated")
    parser.add_argument("--seeds", type=ints, default=[0], help="comma-separated, e.g. 0,1,2")
    parser.add_argument("--tag", help="write results/dev-suite-<tag>.md and .json")
    parser.add_argument(
        "--docs", type=Path, help="put the table into this file's dev-suite section"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"{QUICK_ITERATIONS} iterations, a tiny forest"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="OMP/MKL threads of the CLI children and the forest's n_jobs (default: unset; "
        "the forest uses every usable core)",
    )
    parser.add_argument("--note", help="a line printed with the results (e.g. machine load)")
    parser.add_argument(
        "--report-from",
        type=Path,
        help="run nothing: the report of the rows a stopped run streamed to this .jsonl",
    )
    args = parser.parse_args(argv)
    args.n_jobs = args.threads or len(os.sched_getaffinity(0))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_from:
        return rebuild(args)
    info = machine_info("cpu")
    print(machine_markdown(info, command_line()), flush=True)
    stream = RESULTS_DIR / f"dev-suite-{args.tag}.jsonl" if args.tag else None
    if stream:
        stream.parent.mkdir(parents=True, exist_ok=True)
        header = {"command": command_line(), "machine": info, "arguments": _arguments(args)}
        stream.write_text(json.dumps(header) + "\n")
    rows, started = [], time.perf_counter()
    for seed in args.seeds:
        for name in args.cases:
            row = run_case(name, seed, args)
            rows.append(row)
            if stream:
                with stream.open("a") as f:
                    f.write(json.dumps(row) + "\n")
            show = {
                k: f"{row[k]['dice']:.4f} in {row[k]['seconds']:.1f} s"
                if "dice" in row[k]
                else "FAILED " + row[k]["error"].splitlines()[-1][:200]
                for k in ("default", "forest")
            }
            print(
                f"[{time.perf_counter() - started:6.0f} s] {name} seed {seed}: "
                f"default {show['default']} ({row['default'].get('method', '-')}), "
                f"forest {show['forest']}",
                flush=True,
            )
    return publish(args, rows, info, report(rows, args.cases, args, info))


def rebuild(args) -> int:
    """The report of a run that was stopped, from the rows it streamed (``--report-from``).

    Only seeds that finished every case the stream holds are kept, so each row of the
    table averages the same seeds.
    """
    path = args.report_from
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    header = next((line for line in lines if "case" not in line), None)
    rows = [line for line in lines if "case" in line]
    args.cases = [c for c in CASES if any(r["case"] == c for r in rows)]
    done = {
        s
        for s in {r["seed"] for r in rows}
        if len({r["case"] for r in rows if r["seed"] == s}) == len(args.cases)
    }
    if not rows or not done:
        print(f"--report-from: {path} holds no seed with every case", file=sys.stderr)
        return 2
    dropped = len([r for r in rows if r["seed"] not in done])
    rows = [r for r in rows if r["seed"] in done]
    args.seeds = sorted(done)
    info = header["machine"] if header else machine_info("cpu")
    for key in ("quick", "threads", "n_jobs", "note") if header else ():
        # The settings the rows were measured with (a --note given now still wins).
        if key != "note" or not args.note:
            setattr(args, key, header["arguments"].get(key, getattr(args, key)))
    source = f"Rebuilt from the rows streamed to `{path.name}`"
    if header:
        source += f" by `{header['command']}`"
    if dropped:
        source += f"; {dropped} rows of seeds that did not finish every case left out"
    markdown = report(rows, args.cases, args, info)
    return publish(args, rows, info, f"{source}.\n\n{markdown}")


def _arguments(args) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}


def publish(args, rows: list[dict], info: dict, markdown: str) -> int:
    """Print the report; write it with ``--tag`` and ``--docs``. 1 if a run failed."""
    print("\n" + markdown)
    if args.tag:
        payload = {"command": command_line(), "machine": info, "arguments": _arguments(args)}
        paths = write_results("dev-suite", args.tag, {**payload, "results": rows}, markdown)
        print("wrote " + ", ".join(map(str, paths)))
    if args.docs:
        replace_readme_section(args.docs, "dev-suite", markdown)
        print(f"wrote the dev-suite section of {args.docs}")
    return 1 if any("error" in r[k] for r in rows for k in ("default", "forest")) else 0


if __name__ == "__main__":
    sys.exit(main())
