"""Shared fixtures: tiny synthetic projects and training configs that run in seconds."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ssl_seg.config import TrainConfig

TINY_NET = (8, 16, 16, 32, 32, 8)


def disks_volume(shape=(8, 32, 32), seed=0):
    """A noisy image of bright disks and its binary labels (uint8)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[: shape[0], : shape[1], : shape[2]]
    labels = np.zeros(shape, np.uint8)
    for cy, cx, r in ((10, 10, 6), (22, 20, 7)):
        labels[((y - cy) ** 2 + (x - cx) ** 2) < r**2] = 1
    labels[: shape[0] // 4] = 0  # some empty slices
    image = (
        (labels.astype(np.float32) * 800 + 100 + rng.normal(0, 40, shape))
        .clip(0)
        .astype(np.uint16)
    )
    return image, labels


@pytest.fixture
def tiny_config():
    def make(**overrides):
        values = dict(
            iterations=3,
            features=TINY_NET,
            patch_size=32,
            labelled_batch=1,
            unlabelled_batch=1,
            threads=1,
            method="supervised",
        )
        values.update(overrides)
        return TrainConfig(**values)

    return make


@pytest.fixture
def tiny_project(tmp_path):
    from napari_ssl_seg.store import Project

    image, labels = disks_volume()
    project = Project.create(tmp_path / "p.zarr", image, voxel_size=(2.0, 0.5, 0.5))
    project.annotate_slices(labels, [1, 4], source="test")
    return project, image, labels
