"""Diffusion teacher + twin student (Ciampi et al., arXiv 2504.01547, "SuperDiffusion").

The teacher is a conditional DDPM with two pathways, each a time-conditioned MONAI
``DiffusionModelUNet``:

* mask pathway: input [noisy one-hot mask in [-1, 1] (K) || image (C)], predicts the clean
  mask (x0-prediction). Its output is used as the class logits of the segmentation.
* image pathway: input [noisy image (C) || mask in [-1, 1] (K)], predicts the noise.

The student is a twin with a mask pathway only. Training has two stages:

1. Label-free pretraining of the teacher (:meth:`DiffusionMethod.pretrain_loss`; off by
   default, ``pretrain_iterations`` turns it on, see its comment): the mask
   pathway segments the image, the image pathway denoises a noised copy of the image given
   that mask, and the noise MSE trains both pathways (the gradient flows through the mask).
2. Co-training (:meth:`DiffusionMethod.training_loss`): teacher and student are supervised
   on labelled voxels and by each other's argmax on unlabelled images (CPS), plus R rounds
   in which the teacher reconstructs the image from its own mask and re-segments it.

Where we differ from the authors' code (methods.md section 1), and why:

* The mask pathway's x0 estimate is mapped to [0, 1] with a softmax (the code uses
  (m + 1) / 2 and then a softmax inside its Dice loss). The x0 map is the class logits, so
  the probabilities, the losses and the mask fed to the image pathway (2 softmax - 1) are
  all consistent and bounded however large the logits grow.
* Prediction is one x0 step at a fixed timestep with seeded noise, not at a random t, so
  it is deterministic; optional averaging over several timesteps and DDIM sampling (eta 0,
  each step to the next timestep of MONAI's linspace list).
* Rounds may be chained (``chained_rounds``); the code re-samples from the first mask.
* The supervised terms default to 0.5 (CE + Dice) with per-voxel weights; "dice" gives the
  code's Dice-only losses. The label-free probe of stage 1 (for checkpoint selection) is
  left out: it needs labels and never trains the backbones.
* Images are used as normalised by the engine (the code also maps them with 2x - 1), and
  reconstructions are clamped to each image's intensity range (x0 from a noise estimate
  explodes at large t, where sqrt(alpha_bar) is tiny).
* MONAI's UNet injects the time in every residual block (the code: once, after the input
  block) and its middle self-attention is removed (the code has none; it costs 3x on CPU).
* Its GroupNorm layers are BatchNorm by default (``norm``): trained on one slice, the
  GroupNorm teacher painted nuclei over empty slices, as instance norm does in a plain
  UNet; after training the mask pathways' statistics are re-averaged over training-like
  batches (:meth:`DiffusionMethod.batchnorm_forward`).

Label contract: on annotated voxels 0 is background and 1..K-1 are classes; voxels nobody
annotated carry weight 0 and are never background.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, NoiseSchedules
from torch import nn

from napari_ssl_seg.errors import InvalidInputError
from napari_ssl_seg.losses import linear_rampup, sigmoid_rampup, soft_dice_loss, weighted_ce_dice
from napari_ssl_seg.methods import register
from napari_ssl_seg.methods._shared import check_fraction, joint_images
from napari_ssl_seg.methods.base import Batch, NetworkConfig, SSLMethod

_SIGMOID_SCHEDULE = "napari_ssl_seg_sigmoid"


def _sigmoid_schedule(num_train_timesteps: int, start: float = -3.0, end: float = 3.0):
    """Sigmoid alpha-bar schedule (Jabri et al. 2022), the default of the authors' library."""
    t = torch.linspace(0, 1, num_train_timesteps + 1, dtype=torch.float64)
    v_start, v_end = torch.tensor(start).sigmoid(), torch.tensor(end).sigmoid()
    alpha_bar = (v_end - (t * (end - start) + start).sigmoid()) / (v_end - v_start)
    alpha_bar = alpha_bar / alpha_bar[0]
    return (1 - alpha_bar[1:] / alpha_bar[:-1]).clip(0, 0.999).float()


if _SIGMOID_SCHEDULE not in NoiseSchedules:
    NoiseSchedules.add_def(_SIGMOID_SCHEDULE, "sigmoid alpha-bar schedule, start -3, end 3")(
        _sigmoid_schedule
    )

#: Setting value -> MONAI ``NoiseSchedules`` name.
SCHEDULES = {"sigmoid": _SIGMOID_SCHEDULE, "linear": "linear_beta", "cosine": "cosine"}


def _check_choice(name: str, value: object, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


def _as_int_tuple(value) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [v for v in value.replace(" ", "").split(",") if v]
    return tuple(int(v) for v in value)


@dataclass
class DiffusionSettings:
    """Settings of the diffusion teacher; CPU defaults, the paper's value in each comment."""

    width: int = 16  # channels of the first level (multiple of 8); paper 64
    depth: int = 3  # levels, channels width * 2**i; paper 4 (64, 128, 256, 512)
    timesteps: int = 1000  # training noise schedule length T; paper 1000
    schedule: str = "sigmoid"  # "sigmoid" | "linear" | "cosine"; paper sigmoid (library default)
    # Stage-1 cycle iterations (0 = no stage 1); paper 200 epochs (PAPER_SIZE: 2000). Off
    # by default: at CPU budgets 200 label-free iterations lowered the co-trained teacher
    # (2 rounds, 180 iterations, seeds 0/1/2, 2 cores): 1 clean slice 0.965 -> 0.959 and 3
    # clean slices 0.972 -> 0.969 (lower on every seed), 3 noisy slices 0.962 -> 0.954
    # (0.959/0.964/0.938).
    pretrain_iterations: int = 0
    # R pseudo-label rounds per iteration (0 = CPS only); paper 3, 5 or 10. Measured on the
    # sample (3 slices, no stage 1, 180 iterations, 2 cores, engine rounds, seeds 0/1/2):
    # R=1 clean 0.968 (seed 1 0.960), noisy 0.961; R=2 clean 0.972 (0.973/0.971/0.973),
    # noisy 0.962; R=3 clean 0.972, noisy 0.963. An iteration costs 1.4x R=1's with R=2 and
    # 2.2x with R=3 (README). (auto, from one slice, trained
    # this method with R=1 until it picked mean-teacher instead: README.)
    rounds: int = 2
    # Round r conditions on round r-1's mask; paper False (re-sample from the first mask).
    # Measured on the sample (3 slices, R=2, 60 iterations, seed 0, no stage 1): Dice 0.938
    # reference against 0.934 chained, so the reference behaviour stays the default.
    chained_rounds: bool = False
    diff_weight: float = 1.0  # w_d, weight of the round terms (divided by R); paper 1
    unsup_weight: float = 1.0  # lambda at the end of the ramp; paper 1
    rampup: str = "linear"  # "linear" | "sigmoid"; paper linear, (epoch + 1) / epochs
    rampup_fraction: float = 1.0  # ramp length as a fraction of the run; paper 1.0
    supervised_loss: str = "ce_dice"  # "ce_dice" | "dice" (every term); paper "dice"
    inference_timestep: int = 100  # t of the one-step x0 prediction; paper a random t
    inference_timesteps: tuple[int, ...] = ()  # average over these t instead; paper none
    inference_seed: int = 0  # seed of the mask noise at inference; paper unseeded
    ddim_steps: int = 0  # > 0: DDIM (eta 0) with this many steps; paper none (never 1000)
    # "teacher" | "student" | "both" (the two mask pathways' softmaxes averaged, twice the
    # prediction time); paper the better of teacher and student on validation
    deploy: str = "teacher"
    # "batch" (BatchNorm, statistics re-averaged after training like the other methods'
    # nets) | "group" (GroupNorm: MONAI's and the paper's). GroupNorm normalises each
    # sample alone and, trained on 1 slice, paints nuclei over empty slices; measured
    # (1 slice, no stage 1, 180 iterations, 2 cores, Dice after the vote): clean seed 0
    # 0.953 group -> 0.971 batch; batch clean seed 1 0.975, noisy seed 0 0.954 (supervised
    # 0.939 / 0.924 / 0.845; the GPU table's group-norm rows: 0.840 +- 0.201 clean,
    # 0.593 noisy). Paper: group.
    norm: str = "batch"

    def __post_init__(self) -> None:
        self.inference_timesteps = _as_int_tuple(self.inference_timesteps)
        if self.width < 8 or self.width % 8:
            raise ValueError(f"width must be a positive multiple of 8, got {self.width}")
        if self.depth < 2:
            raise ValueError(f"depth must be >= 2, got {self.depth}")
        if self.timesteps < 2:
            raise ValueError(f"timesteps must be >= 2, got {self.timesteps}")
        for name in ("pretrain_iterations", "rounds", "ddim_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.ddim_steps > self.timesteps:
            raise ValueError(
                f"ddim_steps must be <= timesteps={self.timesteps}, got {self.ddim_steps}"
            )
        for t in (self.inference_timestep, *self.inference_timesteps):
            if not 0 <= t < self.timesteps:
                raise ValueError(f"inference timesteps must lie in [0, {self.timesteps}), got {t}")
        check_fraction("rampup_fraction", self.rampup_fraction)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("rampup", self.rampup, ("linear", "sigmoid"))
        _check_choice("supervised_loss", self.supervised_loss, ("ce_dice", "dice"))
        _check_choice("deploy", self.deploy, ("teacher", "student", "both"))
        _check_choice("norm", self.norm, ("group", "batch"))


#: Overrides for a GPU run at the authors' size (2D: 128 x 128 inputs, batch 8, Adam with
#: lr 1e-3 in stage 1 and 1e-2 in stage 2, 20-epoch warm-up then StepLR(50, 0.5)).
PAPER_SIZE = {
    "width": 64,
    "depth": 4,
    "rounds": 3,
    "supervised_loss": "dice",
    "pretrain_iterations": 2000,  # 200 epochs of ceil(N / 8) iterations (N = 85 for GlaS)
    "norm": "group",
}


def time_unet(spatial_dims: int, in_channels: int, out_channels: int, s: DiffusionSettings):
    """A time-conditioned MONAI UNet without attention, ``net(x, t)``."""
    net = DiffusionModelUNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=tuple(s.width * 2**i for i in range(s.depth)),
        attention_levels=(False,) * s.depth,
        num_res_blocks=1,
        norm_num_groups=8,
    )
    net.middle_block.attention = nn.Identity()  # MONAI always builds one; see module notes
    # MONAI zero-initialises the head; with a zero image pathway no cycle gradient would
    # reach the mask pathway on the first steps, so use the usual conv init (as the code).
    net.out[-1].conv.reset_parameters()
    if s.norm == "batch":
        _group_to_batch_norm(net, spatial_dims)
    return net


def _group_to_batch_norm(net: nn.Module, spatial_dims: int) -> None:
    """Replace every GroupNorm of ``net`` in place by a BatchNorm over the same channels.

    GroupNorm normalises each sample on its own, so an empty slice's faint background is
    stretched to the contrast of a full one (the failure the BasicUNet nets avoid with
    BatchNorm, see :class:`~napari_ssl_seg.methods.base.NetworkConfig`).
    """
    batch_norm = nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, batch_norm(child.num_channels, eps=child.eps))


@register
class DiffusionMethod(SSLMethod):
    """Two-pathway DDPM teacher co-trained with a mask-only twin student.

    ``network`` (the shared BasicUNet settings) is not used: both nets are
    ``DiffusionModelUNet`` sized by ``settings.width`` and ``settings.depth``.
    """

    name = "diffusion"
    summary = "Diffusion teacher + twin student with cycle pretraining (Ciampi et al. 2025)"
    settings_class = DiffusionSettings

    def __init__(
        self,
        *,
        in_channels: int,
        num_classes: int,
        spatial_dims: int,
        total_iterations: int,
        network: NetworkConfig,
        settings: DiffusionSettings,
    ) -> None:
        super().__init__(
            in_channels=in_channels,
            num_classes=num_classes,
            spatial_dims=spatial_dims,
            total_iterations=total_iterations,
            network=network,
            settings=settings,
        )
        if not isinstance(settings, DiffusionSettings):
            raise TypeError(f"settings must be DiffusionSettings, got {type(settings).__name__}")
        c, k, d = in_channels, num_classes, spatial_dims
        self.teacher = nn.ModuleDict(
            {"mask": time_unet(d, k + c, k, settings), "image": time_unet(d, c + k, c, settings)}
        )
        self.student = nn.ModuleDict({"mask": time_unet(d, k + c, k, settings)})
        schedule = SCHEDULES[settings.schedule]
        self.scheduler = DDPMScheduler(settings.timesteps, schedule, prediction_type="sample")
        self.ddim = DDIMScheduler(settings.timesteps, schedule, prediction_type="sample")

    # --- the two operators --------------------------------------------------------
    def _check_image(self, image: torch.Tensor, what: str) -> None:
        if image.ndim != self.spatial_dims + 2 or image.shape[1] != self.in_channels:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise InvalidInputError(
                f"{what} must be (B, {self.in_channels}, {axes}), got shape {tuple(image.shape)}"
            )

    def _run(self, net, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``net(x, t)`` with x zero-padded to a multiple of the UNet's downsampling."""
        step = 2 ** (self.settings.depth - 1)
        size = x.shape[2:]
        pad = [p for s in reversed(size) for p in (0, -s % step)]
        out = net(F.pad(x, pad), t) if any(pad) else net(x, t)
        return out[(..., *[slice(0, s) for s in size])]

    def _timesteps(self, n: int, device) -> torch.Tensor:
        return torch.randint(0, self.settings.timesteps, (n,), device=device)

    def _segment(self, net, image, t=None, noise=None) -> torch.Tensor:
        """One x0 forward of a mask pathway on a blank mask noised at ``t``; returns logits."""
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        blank = torch.full(shape, -1.0, device=image.device, dtype=image.dtype)
        blank[:, 0] = 1.0  # all background, in [-1, 1]
        t = self._timesteps(shape[0], image.device) if t is None else t
        noise = torch.randn_like(blank) if noise is None else noise
        noisy = self.scheduler.add_noise(blank, noise, t)
        return self._run(net, torch.cat([noisy, image], 1), t)

    def _reconstruct(self, image, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher image pathway at a random t given ``mask`` in [-1, 1].

        Returns the clamped x0 estimate and the per-sample noise MSE (B,).
        """
        t = self._timesteps(image.shape[0], image.device)
        noise = torch.randn_like(image)
        noisy = self.scheduler.add_noise(image, noise, t)
        eps = self._run(self.teacher["image"], torch.cat([noisy, mask], 1), t)
        mse = (eps - noise).square().flatten(1).mean(1)
        a = self.scheduler.alphas_cumprod.to(image)[t].view(-1, *[1] * (image.ndim - 1))
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        lo = image.flatten(1).amin(1).view_as(a)
        hi = image.flatten(1).amax(1).view_as(a)
        return torch.maximum(torch.minimum(x0, hi), lo), mse

    def _seg_loss(self, logits, target, weight) -> torch.Tensor:
        if weight.sum() <= 0:
            return logits.sum() * 0.0
        if self.settings.supervised_loss == "dice":
            return soft_dice_loss(logits.softmax(1), target, weight)
        return weighted_ce_dice(logits, target, weight)

    def _ramp(self, step: int) -> float:
        length = self.settings.rampup_fraction * self.total_iterations
        ramp = linear_rampup(step + 1, length)
        if self.settings.rampup == "sigmoid":
            ramp = sigmoid_rampup(step, length)
        return self.settings.unsup_weight * ramp

    # --- stage 1 ------------------------------------------------------------------
    def pretrain_iterations(self) -> int:
        return self.settings.pretrain_iterations

    def pretrain_loss(self, unlabelled: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Label-free cycle loss: MSE of the image pathway's noise given the teacher's mask.

        ``unlabelled.image`` is (B, C, *spatial); ``target`` and ``weight`` are ignored.
        """
        image = unlabelled.image
        self._check_image(image, "unlabelled.image")
        mask = 2 * self._segment(self.teacher["mask"], image).softmax(1) - 1
        _, mse = self._reconstruct(image, mask)  # gradient flows through mask
        loss = mse.mean()
        return loss, {"cycle": float(loss.detach())}

    def pretrain_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}

    def load_pretrain_state(self, state: dict[str, torch.Tensor]) -> None:
        try:
            self.teacher.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(
                f"pretrain state does not fit this teacher (other width, depth or classes?): {err}"
            ) from err

    # --- stage 2 ------------------------------------------------------------------
    def training_loss(
        self, labelled: Batch, unlabelled: Batch, step: int
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L_l + lambda(step) L_u of teacher and student (methods.md section 1.4).

        ``labelled`` has ``image`` (B, C, *spatial), ``target`` (B, *spatial) int64 and
        ``weight`` (B, *spatial); on annotated voxels 0 is background and 1..K-1 are
        classes, voxels with weight 0 are ignored. ``unlabelled`` has only ``image``.
        """
        self._check_image(labelled.image, "labelled.image")
        image, n = joint_images(labelled, unlabelled)
        y, w = labelled.target, labelled.weight
        logits_t = self._segment(self.teacher["mask"], image)
        logits_s = self._segment(self.student["mask"], image)
        pseudo_t, pseudo_s = logits_t[n:].argmax(1).detach(), logits_s[n:].argmax(1).detach()
        ones = torch.ones(pseudo_t.shape, device=image.device, dtype=image.dtype)

        sup = self._seg_loss(logits_s[:n], y, w) + self._seg_loss(logits_t[:n], y, w)
        cps = self._seg_loss(logits_s[n:], pseudo_t, ones) + self._seg_loss(
            logits_t[n:], pseudo_s, ones
        )
        rounds_l = rounds_u = image.new_zeros(())
        mask = (2 * logits_t.softmax(1) - 1).detach()
        for _ in range(self.settings.rounds):
            recon, mse = self._reconstruct(image, mask)
            logits_r = self._segment(self.teacher["mask"], recon.detach())
            rounds_l = rounds_l + self._seg_loss(logits_r[:n], y, w) + mse[:n].sum() / max(n, 1)
            rounds_u = rounds_u + self._seg_loss(logits_r[n:], pseudo_s, ones)
            rounds_u = rounds_u + mse[n:].sum() / max(len(image) - n, 1)
            if self.settings.chained_rounds:
                mask = (2 * logits_r.softmax(1) - 1).detach()
        wd = self.settings.diff_weight / max(self.settings.rounds, 1)
        ramp = self._ramp(step)
        loss = sup + wd * rounds_l + ramp * (cps + wd * rounds_u)
        parts = {"sup": sup, "cps": cps, "rounds_l": rounds_l, "rounds_u": rounds_u}
        return loss, {**{k: float(v.detach()) for k, v in parts.items()}, "ramp": ramp}

    # --- inference ----------------------------------------------------------------
    def batchnorm_forward(self, image: torch.Tensor) -> None:
        """Both mask pathways on ``image`` (B, C, *spatial) at random t, as in training.

        Used to re-average BatchNorm statistics (``norm="batch"``); the image pathway is
        not used at inference and keeps its running statistics.
        """
        for net in (self.teacher["mask"], self.student["mask"]):
            self._segment(net, image)

    @torch.no_grad()
    def predict(self, image: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities of the deployed mask pathway(s), deterministic.

        Parameters
        ----------
        image : (B, C, H, W) or (B, C, D, H, W) float32 tensor

        Returns
        -------
        (B, K, H, W) or (B, K, D, H, W) float32 tensor
            One x0 step at each of ``inference_timesteps`` (or ``inference_timestep``),
            averaged; or DDIM with ``ddim_steps`` steps. The mask noise comes from a
            generator seeded with ``inference_seed``. ``deploy="both"`` averages the
            teacher's and the student's probabilities.
        """
        self._check_image(image, "image")
        s = self.settings
        nets = {
            "teacher": [self.teacher["mask"]],
            "student": [self.student["mask"]],
            "both": [self.teacher["mask"], self.student["mask"]],
        }[s.deploy]
        shape = (image.shape[0], self.num_classes, *image.shape[2:])
        probs = 0
        for net in nets:
            # Each pathway sees the same mask noise, so "both" averages the networks only.
            gen = torch.Generator().manual_seed(s.inference_seed)
            if s.ddim_steps:
                mask = torch.randn(shape, generator=gen).to(image)
                probs = probs + self._ddim(net, image, mask).softmax(1)
                continue
            timesteps = s.inference_timesteps or (s.inference_timestep,)
            for t in timesteps:
                t_batch = torch.full((shape[0],), t, device=image.device, dtype=torch.long)
                mask = torch.randn(shape, generator=gen).to(image)
                step = self._segment(net, image, t_batch, mask).softmax(1)
                probs = probs + step / len(timesteps)
        return probs / len(nets)

    def _ddim(self, net, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) on the mask from pure noise; returns the last step's logits.

        Each step takes the mask from t to the next timestep of the list (alpha_bar = 1
        after the last): x_next = sqrt(a_next) x0 + sqrt(1 - a_next) eps, with eps read
        from x_t and x0. MONAI's ``DDIMScheduler.step`` assumes a stride of T // steps,
        which its own linspace ``set_timesteps`` does not follow (1000 steps, 5: 999 -> 799
        there, while the next step is told t = 749), so only its list is used.
        """
        self.ddim.set_timesteps(self.settings.ddim_steps)
        timesteps = [int(t) for t in self.ddim.timesteps]
        alpha_bar = self.scheduler.alphas_cumprod.to(image)
        logits = None
        for t, t_next in zip(timesteps, [*timesteps[1:], None], strict=True):
            t_batch = torch.full((image.shape[0],), t, device=image.device, dtype=torch.long)
            logits = self._run(net, torch.cat([mask, image], 1), t_batch)
            x0 = 2 * logits.softmax(1) - 1
            a = alpha_bar[t]
            a_next = alpha_bar[t_next] if t_next is not None else torch.ones_like(a)
            eps = (mask - a.sqrt() * x0) / (1 - a).sqrt()
            mask = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        return logits
