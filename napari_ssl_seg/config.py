"""Settings of one training round, with the reason for each default.

Defaults are scaled for an interactive round of about a minute on a 2-core laptop CPU;
the papers' values (SSL4MIS / DTC protocol) are noted beside them. The whole config is
saved in every checkpoint and round record.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import re
from dataclasses import dataclass, field
from typing import Any

from napari_ssl_seg.errors import InvalidInputError

MODES = ("2d", "2.5d", "3d")
INITS = ("previous", "scratch")
#: What a round may write (``TrainConfig.output``): "auto" chooses by validation Dice.
OUTPUTS = ("auto", "network", "forest", "ensemble")
#: The method name that lets each round pick one: see :func:`resolve_method`.
AUTO = "auto"
#: What "auto" trains from one annotated slice (2D): the unlabelled slices help most there.
#: Without normalisation layers, 2 cores, 180 iterations, seeds 0/1/2 (README, "No
#: normalisation layers"): mean-teacher clean 0.971, noisy 0.966 in 28 s a round, against
#: supervised 0.963 / 0.963 (17 s) and the diffusion round auto ran before (60 iterations,
#: one pseudo-label round) 0.969 / 0.961 (62 s).
AUTO_ONE_SLICE_METHOD = "mean-teacher"
AUTO_SUMMARY = (
    f"each round trains {AUTO_ONE_SLICE_METHOD} when one slice is annotated, supervised "
    "otherwise; with output auto (the default) it then writes the network, the pixel forest "
    "or their mean, whichever scores best on held-out human labels"
)
#: Budget presets the widget offers (iterations of the default method); "quick", the
#: widget's default, is TrainConfig's default round (the CLI's).
PRESETS = {"quick": 180, "balanced": 400, "thorough": 1200}
#: Devices a config may name ("cuda:N" picks a GPU by index).
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
DEVICES_ALLOWED = "'auto', 'cpu', 'mps', 'cuda' or 'cuda:N'"


@dataclass
class TrainConfig:
    """One round of semi-supervised training.

    Attributes
    ----------
    method : str
        Registered method name (``napari-ssl-seg methods`` lists them), or "auto": each
        round picks by the number of annotated slices (:func:`resolve_method`).
    iterations : int
        Optimiser steps (papers: 6000 for LA 3D, 30000 for ACDC 2D).
    seed : int
        Seeds torch, numpy and the augmentations; CPU runs are then deterministic.
    device : str
        "auto" picks CUDA, then MPS, then the CPU; or "cpu", "cuda", "cuda:1", "mps".
    threads : int
        torch CPU threads (0 = every core).
    mode : {"2d", "2.5d", "3d"}
        2D slices along the project axis (fast on a CPU), 2.5D (neighbour slices as
        channels) or 3D patches.
    patch_size : int
        Side of the random square crops in 2D/2.5D (cube side in 3D is ``patch_size // 2``).
    labelled_batch, unlabelled_batch : int
        Two-stream batch (papers: 12 + 12 in 2D, 2 + 2 in 3D).
    lr : float
        Adam learning rate with polynomial decay (papers: SGD 0.01, momentum 0.9).
    features : tuple of 6 ints
        MONAI BasicUNet widths (SSL4MIS UNet: 16..256).
    norm : {"none", "batch", "instance", "group"}
        Normalisation layers of the UNets (see NetworkConfig). "none" (the default):
        plain convolutions, which keep the image's absolute intensity; batch norm over
        two small crops and instance norm (which paints empty slices) do not.
    clip_grad_norm : float
        Largest global gradient norm of a training step (0 = no clipping).
    dropout : float
        Dropout in the UNet blocks.
    init : {"previous", "scratch"}
        Start round r+1 from round r's weights or from scratch (the default; same cost
        per round, measured better, see the default's comment).
    pseudo_threshold : float
        Round r+1 learns from round r's pseudo-labels where its confidence (max class
        probability) is at least this; human voxels always win.
    pseudo_class_share : float
        Per class, the most confident this share of the voxels predicted as that class
        also become pseudo-labels when below ``pseudo_threshold`` (class-balanced
        self-training; :func:`napari_ssl_seg.data.confident_pseudo_labels`); 0 = the
        threshold alone.
    pseudo_weight : float
        Loss weight of those pseudo-labelled voxels (human voxels weigh 1).
    human_fraction : float
        Share of the labelled stream drawn from human-labelled slices once pseudo-labels
        exist (the rest from pseudo-labelled slices).
    vote : int
        Width in voxels of the majority vote applied to the predicted labels (odd; 1 =
        off). In-plane it is this wide; along the slicing axis it is scaled by the voxel
        size, so a volume with thick slices is voted on in-plane only (see
        :func:`napari_ssl_seg.inference.majority_vote`).
    smoothing : float
        Sigma, in in-plane pixels, of a 3D Gaussian that smooths the normalised image
        before the network sees it (across slices the same physical extent where the
        voxel size is known, like ``vote``; 0 = off).
    output : {"auto", "network", "forest", "ensemble"}
        What the round writes: "auto" chooses, by Dice on the held-out human voxels,
        among the network, the pixel forest (:mod:`napari_ssl_seg.forest`) and the mean
        of their probabilities; a named source is written as is. Either way the
        background bias and the vote are kept only where they raise that Dice
        (:mod:`napari_ssl_seg.validation`). 3D mode writes the network.
    validation_fraction : float
        Share of the human-labelled voxels held out for validation (a band of rows of
        each human slice, rotating with the round and seed), in [0, 0.5]; 0 = none, and
        then the round writes the network (or the named ``output``) unvalidated.
    settings : dict
        The method's own settings (``napari-ssl-seg methods`` lists them and defaults).
    """

    # "auto" (resolve_method): supervised from 2+ annotated slices, where it is the
    # fastest and within 0.2 points of the best (README, "No normalisation layers": 2
    # cores, 3 slices, seeds 0/1/2: supervised 0.973 clean, 0.965 noisy, 17 s; dtc
    # 0.975 / 0.965 in 26 s would put the CLI round over 4x the forest's time); from ONE
    # slice AUTO_ONE_SLICE_METHOD, which learns from the unlabelled slices. Round 2+
    # learns from them through round 1's confident pseudo-labels.
    method: str = AUTO
    # 180 iterations with 15 BatchNorm batches measured the same as 200 with 30 (mean Dice
    # 0.951 against 0.950 over clean/noisy x seeds 0, 1; 3 slices) and 2.5 s faster.
    iterations: int = 180
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    mode: str = "2d"
    patch_size: int = 96
    labelled_batch: int = 2
    unlabelled_batch: int = 2
    lr: float = 3e-3
    features: tuple[int, ...] = (16, 32, 64, 128, 256, 16)
    # No normalisation layers: BatchNorm over the two 96^2 crops of a batch normalised an
    # all-background batch as if it held nuclei (p(nucleus) ~0.35 there in training mode)
    # and left the network unsure everywhere (median p(nucleus) 0.76 inside nuclei on its
    # own training slice); which dim nuclear caps it painted changed with the seed.
    # supervised, 180 iterations, 2 cores, seeds 0/1/2, with clip_grad_norm 0.25 (batch
    # norm in brackets): 3 slices clean 0.971/0.975/0.972 (0.975/0.955/0.975), noisy
    # 0.964/0.965/0.966 (0.963/0.963/0.966); 1 slice clean 0.965/0.960/0.965
    # (0.938/0.929/0.925), noisy 0.964/0.963/0.964 (0.922/0.935/0.954) (tune_defaults.py;
    # engine rounds for every method: README, "No normalisation layers").
    norm: str = "none"
    # Without normalisation, lr 3e-3 is 1.5x from divergence: unclipped, 1 of 18 runs of
    # the matrix above blew up at step 40 (grad norm 63, Dice 0.90), and at lr 4.5e-3 1 in
    # 6 with clipping at 1. At 0.25 (late gradients are ~2, so most late steps are scaled;
    # Adam is scale-free, spikes are not) lr 6e-3 trained too; Dice as without clipping.
    clip_grad_norm: float = 0.25
    dropout: float = 0.0
    # Retraining from scratch on human labels + corrections + round r's pseudo-labels
    # beat continuing from round r's weights in every case measured (Dice on the untouched
    # slices after 1 and 2 retrain rounds, 2 corrections each, 3 slices, 2 cores): clean
    # seed 0 0.972/0.975 vs 0.964/0.967, seed 1 0.970/0.972 vs 0.963/0.966, noisy seed 0
    # 0.939/0.939 vs 0.934/0.931. Continuing kept round r's boundary bias.
    init: str = "scratch"
    pseudo_threshold: float = 0.9
    # With 0.9 alone, round 2 learnt almost only background: on the sample (3 slices) 5-19 %
    # of the voxels called nucleus reach it against 92-95 % of the background. The
    # demo's round 2 (seeds 0/1/2, untouched slices; round 1 0.974) with share 0 / 0.3 /
    # 0.5 / 0.7: 0.9735 / 0.9747 / 0.9759 / 0.9729 mean, 0.5 above round 1 on every seed.
    pseudo_class_share: float = 0.5
    pseudo_weight: float = 0.5
    human_fraction: float = 0.5
    # 5 voxels: the sample, 3 slices, supervised, 2 cores, seeds 0/1 -> noisy Dice 0.934/0.927
    # to 0.958/0.959, clean 0.972/0.961 to 0.974/0.966 (3: a little less on every case).
    vote: int = 5
    # A 3D Gaussian of 1 pixel before the network: supervised, 3 slices, 180 iterations,
    # voted, 2 cores, seeds 0-5: noisy 0.951 -> 0.964 (better on every seed), clean 0.972
    # -> 0.971 (within the seeds' spread). A slice-wise network gets some 3D context and a
    # denoised input it does not learn to make from 3 slices. 1.5 or in-plane 0.7 scored
    # lower (seeds 0/1); the forest on the same smoothing gains as much (README).
    smoothing: float = 1.0
    # On the development suite the network alone lost to the forest on a thin class, a
    # tiny target and a degraded image (benchmarks/dev_suite.py): a round that validates
    # its candidates never ships something worse than the forest on held-out labels.
    output: str = AUTO
    # A quarter of each slice's labelled rows: enough voxels for a per-class estimate on
    # the sample's nuclei, and the network still trains on three quarters.
    validation_fraction: float = 0.25
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._check_types()
        checks = [
            (self.iterations >= 1, "iterations", "an integer >= 1"),
            (self.mode in MODES, "mode", f"one of {MODES}"),
            (self.init in INITS, "init", f"one of {INITS}"),
            (self.patch_size >= 16, "patch_size", "an integer >= 16"),
            (self.labelled_batch >= 1, "labelled_batch", ">= 1"),
            (self.unlabelled_batch >= 0, "unlabelled_batch", ">= 0"),
            (self.lr > 0, "lr", "> 0"),
            (self.clip_grad_norm >= 0, "clip_grad_norm", ">= 0"),
            (bool(DEVICE_PATTERN.fullmatch(self.device)), "device", DEVICES_ALLOWED),
            (0.0 <= self.pseudo_threshold <= 1.0, "pseudo_threshold", "in [0, 1]"),
            (0.0 <= self.pseudo_class_share <= 1.0, "pseudo_class_share", "in [0, 1]"),
            (self.pseudo_weight >= 0, "pseudo_weight", ">= 0"),
            (0.0 < self.human_fraction <= 1.0, "human_fraction", "in (0, 1]"),
            (self.threads >= 0, "threads", ">= 0"),
            (self.vote >= 1 and self.vote % 2 == 1, "vote", "an odd integer >= 1"),
            (
                0.0 <= self.smoothing < float("inf"),
                "smoothing",
                "a number >= 0",
            ),
            (self.output in OUTPUTS, "output", f"one of {OUTPUTS}"),
            (
                self.mode != "3d" or self.output in (AUTO, "network"),
                "output",
                "'auto' or 'network' in 3d mode (the forest is slice-wise)",
            ),
            (0.0 <= self.validation_fraction <= 0.5, "validation_fraction", "in [0, 0.5]"),
            (
                self.method != AUTO or not self.settings,
                "settings",
                f"empty with method {AUTO!r} (method settings need a named method)",
            ),
        ]
        for ok, name, allowed in checks:
            if not ok:
                raise InvalidInputError(
                    f"TrainConfig.{name} must be {allowed}, got {getattr(self, name)!r}"
                )

    def _check_types(self) -> None:
        """Check each value against its field's type; integral numbers become int.

        ``--set iterations=1.5`` or ``features=8`` must fail here with the value, not
        deep in training with a traceback.
        """
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            converted, allowed = _typed(f.name, f.type, value)
            if converted is None:
                raise InvalidInputError(f"TrainConfig.{f.name} must be {allowed}, got {value!r}")
            setattr(self, f.name, converted)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a plain dict, rejecting unknown keys by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InvalidInputError(
                f"unknown TrainConfig key(s) {unknown}; allowed: {sorted(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["features"] = list(self.features)
        return out


def _typed(name: str, type_name: str, value: Any) -> tuple[Any, str]:
    """``value`` as the field's type (None if it is not one), and that type in words."""
    if name == "features":
        ints = [_as_int(v) for v in value] if isinstance(value, (tuple, list)) else []
        ok = len(ints) == 6 and all(v is not None and v >= 1 for v in ints)
        return (tuple(ints) if ok else None), "6 integers >= 1"
    if type_name == "int":
        return _as_int(value), "an integer"
    if type_name == "float":
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return (float(value) if ok else None), "a number"
    if type_name == "str":
        return (value if isinstance(value, str) else None), "a string"
    # settings: the method checks its own keys and values
    return (value if isinstance(value, dict) else None), "a dict"


def _as_int(value: Any) -> int | None:
    """``value`` as an int if it is an integer or an integral float, else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and float(value).is_integer():
        return int(value)
    return None


# ------------------------------------------------------------------------ memory
# Tensors autograd keeps for the backward pass of a MONAI BasicUNet without normalisation
# layers, in float32 values per voxel and per channel of the level's width (encoder and
# decoder, each level at its resolution): measured 4.7-5.0 with
# torch.autograd.graph.saved_tensors_hooks over widths 8..512, 2D and 3D.
_SAVED_VALUES_PER_CHANNEL = 5


def estimate_training_memory(config: TrainConfig) -> int:
    """Bytes of activations one training step keeps for its backward pass, at least.

    The estimate counts one network on one batch of ``labelled_batch`` crops (plus
    ``unlabelled_batch`` for methods that learn from unlabelled slices); methods with
    two networks or teachers need more. Crops are ``patch_size`` squares in 2D/2.5D and
    ``max(32, patch_size // 2)`` cubes in 3D, as the sampler asks for before clipping
    them to the volume.

    Parameters
    ----------
    config : TrainConfig

    Returns
    -------
    int
        Bytes.
    """
    dims = 3 if config.mode == "3d" else 2
    side = max(32, config.patch_size // 2) if dims == 3 else config.patch_size
    side = min(side, 2**40)  # far beyond any memory, and still a finite float below
    f = config.features
    # Encoder levels 0..4, decoder levels 3..1 at the widths they take, the last level f[5].
    widths = sum(f[level] / 2 ** (dims * level) for level in range(5))
    widths += sum(f[level - 1] / 2 ** (dims * level) for level in range(1, 4)) + f[5]
    batch = config.labelled_batch
    if config.method not in (AUTO, "supervised"):  # auto's lower bound is supervised
        batch += config.unlabelled_batch
    values = _SAVED_VALUES_PER_CHANNEL * widths * float(side) ** dims * batch
    return int(values * 4)


def total_memory(device: Any = "cpu") -> int | None:
    """Bytes of memory on ``device`` (RAM for the CPU and MPS); None when unknown."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda":
        import torch

        index = getattr(device, "index", None)
        return int(torch.cuda.get_device_properties(index or 0).total_memory)
    try:
        import psutil
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            return None
    return int(psutil.virtual_memory().total)


def check_training_memory(
    config: TrainConfig, *, device: Any = "cpu", available: int | None = None
) -> None:
    """Refuse a config whose training step cannot fit in memory, before training.

    Parameters
    ----------
    config : TrainConfig
    device : str or torch.device
        Where training runs; its memory is the bound (see :func:`total_memory`).
    available : int, optional
        Bytes to compare with instead of the device's total.

    Raises
    ------
    InvalidInputError
        :func:`estimate_training_memory` exceeds the memory; the message gives both.
    """
    available = total_memory(device) if available is None else available
    need = estimate_training_memory(config)
    if available is None or need <= available:
        return
    gib = 2**30
    raise InvalidInputError(
        f"TrainConfig: a {config.mode} training step with patch_size {config.patch_size}, "
        f"batches {config.labelled_batch} + {config.unlabelled_batch} and features "
        f"{config.features} needs about {need / gib:.1f} GiB of memory for its "
        f"activations; {device} has {available / gib:.1f} GiB; lower patch_size, the "
        "batches or features"
    )


def resolve_method(config: TrainConfig, annotated_slices: int) -> tuple[TrainConfig, str]:
    """The config a round trains with, and why, when ``config.method`` is "auto".

    From one annotated slice: :data:`AUTO_ONE_SLICE_METHOD` (2D mode only; the mode it
    was measured in). Otherwise ``supervised``. Both train the iterations asked for. A
    named method is kept as is.

    Parameters
    ----------
    config : TrainConfig
    annotated_slices : int
        Slices (along the project axis) holding human labels or corrections.

    Returns
    -------
    config : TrainConfig
        A copy with a registered method name.
    reason : str
        One line for the round record and progress ("" for a named method).
    """
    if config.method != AUTO:
        return config, ""
    if annotated_slices <= 1 and config.mode == "2d":
        chosen = dataclasses.replace(config, method=AUTO_ONE_SLICE_METHOD)
        why = f"{annotated_slices} annotated slice: {AUTO_ONE_SLICE_METHOD}"
    else:
        chosen = dataclasses.replace(config, method="supervised")
        why = f"{annotated_slices} annotated slices: supervised"
    return chosen, f"auto ({why})"
