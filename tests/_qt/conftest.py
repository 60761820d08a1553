"""Fixtures of the viewer tests."""

from __future__ import annotations

import pytest

from napari_ssl_seg._sample_data import load_nuclei


@pytest.fixture(scope="module")
def crop():
    """A 12 x 64 x 64 crop of the bundled nuclei sample and its truth."""
    image, truth, _ = load_nuclei()
    return image[24:36, :64, :64].copy(), truth[24:36, :64, :64].copy()
