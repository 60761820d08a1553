"""Command line: ``napari-ssl-seg init | train | correct | export | evaluate | methods | demo``.

A stable contract for scripts and our benchmarks. Every subcommand prints a one-line
error and exits with status 2 on bad input; status 0 on success.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from napari_ssl_seg.errors import InvalidInputError, PathExistsError, SslSegError

PROG = "napari-ssl-seg"


def _parse_value(text: str):
    """'0.5' -> 0.5, '3' -> 3, 'true' -> True, '8,16' -> (8, 16), else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if "," in text:
        return tuple(_parse_value(t) for t in text.split(","))
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _key_values(pairs: Sequence[str], option: str) -> dict:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SslSegError(f"{option} expects KEY=VALUE, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


class ProgressPrinter:
    """Terminal progress: a redrawn bar on a TTY, a line every 10 % otherwise."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.last_tenth: dict[str, int] = {}

    def __call__(self, report: dict) -> None:
        phase, i, n = report["phase"], report.get("iteration", 0), max(1, report.get("total", 1))
        if report.get("choice"):
            self.stream.write(f"method: {report['choice']}\n")
        if report.get("note"):
            self.stream.write(f"note: {report['note']}\n")
        if phase in ("load", "done"):
            return
        losses = report.get("losses", {})
        loss = f" loss {losses['loss']:.4f}" if "loss" in losses else ""
        remaining = report.get("remaining")
        eta = f" eta {remaining:5.0f}s" if remaining is not None else ""
        line = f"{phase:8s} {i:5d}/{n:<5d}{loss} elapsed {report.get('elapsed', 0):5.0f}s{eta}"
        if self.tty:
            bar = "#" * int(30 * i / n)
            self.stream.write(f"\r[{bar:30s}] {line}")
            if i >= n:
                self.stream.write("\n")
        elif (tenth := 10 * i // n) != self.last_tenth.get(phase):
            self.last_tenth[phase] = tenth
            self.stream.write(line + "\n")
        self.stream.flush()


METHOD_HELP = "a name from `napari-ssl-seg methods`, or auto (the default)"


# ------------------------------------------------------------------ subcommands
def cmd_init(args) -> int:
    from napari_ssl_seg.io import open_volume, read_volume
    from napari_ssl_seg.labels import check_labels, parse_slice_list
    from napari_ssl_seg.store import Project

    # Every input is checked before anything is written; Project.create then builds the
    # project, annotations included, beside the target and swaps it in when complete.
    _check_axis(args.axis)
    if args.annotated_slices and not args.labels:
        raise SslSegError("--annotated-slices needs --labels (the labels of those slices)")
    image = open_volume(args.image)
    labels, slices = None, None
    if args.labels:
        labels = read_volume(args.labels).data
        check_labels(
            labels, shape=image.shape, name=str(args.labels), max_classes=args.max_classes
        )
        if args.annotated_slices:
            slices = parse_slice_list(
                args.annotated_slices,
                length=image.shape[args.axis],
                name="--annotated-slices",
            )
    project = Project.create(
        args.project,
        image.data,
        axis=args.axis,
        voxel_size=image.voxel_size,
        source=str(Path(args.image).absolute()),
        labels=labels,
        annotated_slices=slices,
        max_classes=args.max_classes,
        edit_source="cli",
        overwrite=args.overwrite,
    )
    print(
        f"project {project.path}: image {project.shape} {project.image.dtype}, "
        f"axis {project.axis}, "
        f"annotated slices {project.annotated_slices() or 'none'}"
    )
    return 0


def _check_axis(axis: int, option: str = "--axis") -> None:
    if axis not in (0, 1, 2):
        raise InvalidInputError(f"{option} must be 0, 1 or 2, got {axis}")


def cmd_train(args) -> int:
    from napari_ssl_seg.config import TrainConfig
    from napari_ssl_seg.engine import run_round
    from napari_ssl_seg.store import Project

    values = _key_values(args.set, "--set")
    for name in ("method", "iterations", "seed", "device", "threads", "mode"):
        if getattr(args, name) is not None:
            values[name] = getattr(args, name)
    values["settings"] = _key_values(args.setting, "--setting")
    config = TrainConfig.from_dict(values)
    project = Project.open(args.project)
    record = run_round(project, config, progress=None if args.quiet else ProgressPrinter())
    r = record["round"]
    print(
        f"round {r} ({record['method']}, {record['iterations_done']} iterations, "
        f"{record['seconds']} s)"
    )
    print(f"  pseudo-labels: {project.path / record['pseudo_labels']}")
    print(f"  confidence:    {project.path / record['confidence']}")
    print(f"  checkpoint:    {project.checkpoint_path(r)}")
    worst = ", ".join(str(s["slice"]) for s in record["uncertain_slices"][:5])
    print(f"  least confident slices: {worst}")
    from napari_ssl_seg.validation import validation_lines

    for line in validation_lines(record):
        print(f"  {line}")
    return 0


def cmd_correct(args) -> int:
    from napari_ssl_seg.io import read_volume
    from napari_ssl_seg.labels import parse_slice_list
    from napari_ssl_seg.store import Project

    project = Project.open(args.project)
    labels = read_volume(args.labels).data
    slices = parse_slice_list(args.slices, length=project.n_slices, name="--slices")
    edits = project.correct_slices(
        labels, slices, round=args.round, source="cli", max_classes=args.max_classes
    )
    print(f"recorded {len(edits)} corrected slice(s) {slices} of round {edits[0].round}")
    return 0


def cmd_export(args) -> int:
    from napari_ssl_seg.annotation import export_labels
    from napari_ssl_seg.store import Project

    project = Project.open(args.project)
    if args.round is not None:
        project.round_record(args.round)  # a clear error for a round that does not exist
    out = export_labels(project, args.out, round=args.round, overwrite=args.overwrite)
    print(f"exported {'merged labels' if args.round is None else f'round {args.round}'} to {out}")
    return 0


def cmd_evaluate(args) -> int:
    from napari_ssl_seg.io import read_volume
    from napari_ssl_seg.labels import parse_slice_list
    from napari_ssl_seg.metrics import evaluate

    _check_axis(args.axis)
    pred = read_volume(args.prediction)
    truth = read_volume(args.truth)
    exclude = (
        parse_slice_list(
            args.exclude_slices, length=truth.data.shape[args.axis], name="--exclude-slices"
        )
        if args.exclude_slices
        else []
    )
    spacing = truth.voxel_size if args.physical else None
    scores = evaluate(
        pred.data,
        truth.data > 0 if args.binary else truth.data,
        exclude_slices=exclude,
        axis=args.axis,
        spacing=spacing,
    )
    if args.json:
        print(json.dumps(scores, indent=1))
    else:
        for name, row in scores.items():
            print(f"{name:8s} " + "  ".join(f"{k} {v:.4f}" for k, v in row.items()))
    return 0


def cmd_methods(args) -> int:
    from dataclasses import fields

    from napari_ssl_seg.config import AUTO, AUTO_SUMMARY, TrainConfig
    from napari_ssl_seg.methods import get_method, method_names

    default = TrainConfig().method
    print(f"{AUTO}{' (default)' if default == AUTO else ''}: {AUTO_SUMMARY}")
    for name in method_names():
        cls = get_method(name)
        mark = " (default)" if name == default else ""
        print(f"{name}{mark}: {cls.summary}")
        for f in fields(cls.settings_class):
            print(f"    {f.name} = {getattr(cls.settings_class(), f.name)!r}")
    return 0


def cmd_demo(args) -> int:
    from napari_ssl_seg.demo import run_demo

    if not args.headless and _has_display():
        from napari_ssl_seg.demo import open_in_napari

        return open_in_napari(args.project)
    project, out = demo_paths(args.project, args.out)
    run_demo(
        project,
        iterations=args.iterations,
        method=args.method,
        out=out,
        seed=args.seed,
        overwrite=args.overwrite,
        stream=sys.stdout,
    )
    return 0


DEMO_PROJECT, DEMO_OUT = "napari-ssl-seg-demo{}.zarr", "napari-ssl-seg-demo{}-labels.tif"


def demo_paths(project: Path | None, out: Path | None) -> tuple[Path, Path]:
    """The demo's project and export paths: those given, else the first free default.

    Defaults are numbered (``napari-ssl-seg-demo-2.zarr``, ...) when a previous run took
    them, so running the demo again never replaces its earlier results; a path given
    explicitly is kept as it is (and refused later if it exists, unless --overwrite).
    """
    for n in range(1, 10_000):
        suffix = "" if n == 1 else f"-{n}"
        candidate = (
            project or Path(DEMO_PROJECT.format(suffix)),
            out or Path(DEMO_OUT.format(suffix)),
        )
        defaults = [p for p, given in zip(candidate, (project, out), strict=True) if not given]
        if not any(p.exists() or p.is_symlink() for p in defaults):
            return candidate
    raise SslSegError("no free default demo path; pass --project and --out")


def _has_display() -> bool:
    return bool(
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ) or sys.platform in (
        "darwin",
        "win32",
    )


# ---------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("init", help="create a project for an image")
    p.add_argument("project", type=Path)
    p.add_argument("--image", required=True, type=Path)
    p.add_argument("--labels", type=Path, help="slices holding any label count as annotated")
    p.add_argument(
        "--annotated-slices", help="explicit annotated slices, e.g. 3,17,40 (empty ones too)"
    )
    p.add_argument("--axis", type=int, default=0, help="slice axis (default 0)")
    _add_max_classes(p)
    p.add_argument(
        "--overwrite", action="store_true", help="replace the napari-ssl-seg project at PROJECT"
    )
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("train", help="train one round and write its pseudo-labels")
    p.add_argument("project", type=Path)
    p.add_argument("--method", help=METHOD_HELP)
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    p.add_argument("--threads", type=int)
    p.add_argument("--mode", choices=["2d", "2.5d", "3d"])
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="any TrainConfig field"
    )
    p.add_argument(
        "--setting", action="append", default=[], metavar="KEY=VALUE", help="a method setting"
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("correct", help="record slices of a label file as corrections")
    p.add_argument("project", type=Path)
    p.add_argument("--labels", required=True, type=Path)
    p.add_argument("--slices", required=True, help="e.g. 5,9")
    p.add_argument("--round", type=int, help="round corrected (default latest)")
    _add_max_classes(p)
    p.set_defaults(func=cmd_correct)

    p = sub.add_parser("export", help="write merged labels to .tif, .nii(.gz) or .zarr")
    p.add_argument("project", type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument(
        "--round", type=int, help="use this round's pseudo-labels under the human labels"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, ASD per class")
    p.add_argument("prediction", type=Path)
    p.add_argument("truth", type=Path)
    p.add_argument("--exclude-slices")
    p.add_argument("--axis", type=int, default=0)
    p.add_argument(
        "--binary", action="store_true", help="score truth > 0 as one class (instance labels)"
    )
    p.add_argument("--physical", action="store_true", help="distances in the truth's voxel size")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("methods", help="list methods and their settings")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("demo", help="the whole annotation loop on the bundled sample")
    p.add_argument(
        "--project",
        type=Path,
        help=f"default {DEMO_PROJECT.format('')} here, numbered if a previous run took it",
    )
    p.add_argument(
        "--out", type=Path, help=f"default {DEMO_OUT.format('')} here, numbered like --project"
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --project or --out"
    )
    p.add_argument("--method", help=METHOD_HELP)
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--headless", action="store_true", help="never open a window")
    p.set_defaults(func=cmd_demo)
    return parser


def _add_max_classes(parser: argparse.ArgumentParser) -> None:
    from napari_ssl_seg.labels import MAX_CLASSES

    parser.add_argument(
        "--max-classes",
        type=int,
        default=MAX_CLASSES,
        metavar="N",
        help=f"largest label --labels may hold (default {MAX_CLASSES}; more is likely an "
        "instance or intensity image)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except PathExistsError as err:  # the API says overwrite=True; here it is a flag
        print(
            f"{PROG} {args.command}: error: {err.path} already exists; "
            "pass --overwrite to replace it",
            file=sys.stderr,
        )
        return 2
    except (SslSegError, ValueError, OSError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
