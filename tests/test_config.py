"""TrainConfig: every value checked at the boundary, sizes bounded by a memory estimate."""

from __future__ import annotations

import numpy as np
import pytest

from napari_ssl_seg.config import TrainConfig, check_training_memory, estimate_training_memory
from napari_ssl_seg.errors import InvalidInputError

GIB = 2**30


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"iterations": "abc"}, r"TrainConfig\.iterations must be an integer, got 'abc'"),
        ({"iterations": 1.5}, r"TrainConfig\.iterations must be an integer, got 1\.5"),
        ({"iterations": True}, r"TrainConfig\.iterations must be an integer, got True"),
        ({"patch_size": float("inf")}, r"TrainConfig\.patch_size must be an integer, got inf"),
        ({"lr": "fast"}, r"TrainConfig\.lr must be a number, got 'fast'"),
        ({"method": 3}, r"TrainConfig\.method must be a string, got 3"),
        ({"features": 8}, r"TrainConfig\.features must be 6 integers >= 1, got 8"),
        ({"features": (8, 16)}, r"TrainConfig\.features must be 6 integers >= 1, got \(8, 16\)"),
        ({"features": (8, 16, 16, 32, 0, 8)}, r"features must be 6 integers >= 1"),
        ({"features": "816163232"}, r"features must be 6 integers >= 1"),
        ({"device": "foo"}, r"device must be 'auto', 'cpu', 'mps', 'cuda' or .*got 'foo'"),
        ({"device": "cuda:x"}, r"TrainConfig\.device must be .*got 'cuda:x'"),
        ({"settings": [1]}, r"TrainConfig\.settings must be a dict, got \[1\]"),
    ],
)
def test_bad_values(values, match):
    with pytest.raises(InvalidInputError, match=match):
        TrainConfig.from_dict(values)


def test_integral_numbers_are_accepted_as_their_type():
    config = TrainConfig.from_dict(
        {"iterations": 20.0, "patch_size": np.int64(64), "lr": 1, "features": [8.0] * 6}
    )
    assert config.iterations == 20 and type(config.iterations) is int
    assert type(config.patch_size) is int and type(config.lr) is float
    assert config.features == (8,) * 6
    for device in ("auto", "cpu", "cuda", "cuda:1", "mps"):
        assert TrainConfig(device=device).device == device


def test_memory_estimate_grows_with_the_sizes():
    base = estimate_training_memory(TrainConfig())
    assert 1e6 < base < 1 * GIB  # the default round is small
    assert estimate_training_memory(TrainConfig(patch_size=192)) == pytest.approx(4 * base, 0.01)
    assert estimate_training_memory(TrainConfig(labelled_batch=4)) == pytest.approx(2 * base)
    wider = TrainConfig(features=(32, 64, 128, 256, 512, 32))
    assert estimate_training_memory(wider) == pytest.approx(2 * base)
    assert estimate_training_memory(TrainConfig(mode="3d")) > base


@pytest.mark.parametrize("values", [{"patch_size": 10**9}, {"labelled_batch": 100_000}])
def test_sizes_beyond_memory_are_refused_before_training(values):
    config = TrainConfig(**values)
    need = estimate_training_memory(config)
    message = r"needs about [\d.]+ GiB of memory .* has 8\.0 GiB"
    with pytest.raises(InvalidInputError, match=message):
        check_training_memory(config, available=8 * GIB)
    check_training_memory(TrainConfig(), available=8 * GIB)
    assert need > 8 * GIB


def test_training_refuses_a_round_beyond_memory(tiny_project, tiny_config):
    from napari_ssl_seg.engine import run_round

    project, _, _ = tiny_project
    with pytest.raises(InvalidInputError, match="GiB of memory"):
        run_round(project, tiny_config(labelled_batch=10**7))
    assert project.latest_round == 0
