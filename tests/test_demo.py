"""``napari-ssl-seg demo`` end to end (headless, a small budget): the README's main job."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest

from napari_ssl_seg.io import read_volume
from napari_ssl_seg.store import Project

pytestmark = pytest.mark.slow


def test_demo_runs_the_whole_loop(tmp_path):
    project, out = tmp_path / "demo.zarr", tmp_path / "demo-labels.tif"
    result = subprocess.run(
        [sys.executable, "-m", "napari_ssl_seg.cli", "demo", "--headless", "--iterations", "20"]
        + ["--project", str(project), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    scores = [float(d) for d in re.findall(r"round \d .*Dice (\d\.\d+) on 55", result.stdout)]
    assert len(scores) == 2 and all(0.5 < d <= 1 for d in scores), result.stdout
    opened = Project.open(project)
    assert opened.latest_round == 2 and opened.annotated_slices() == [10, 30, 50]
    corrected = [e for e in opened.edits() if e.kind == "correction"]
    assert len(corrected) == 2 and all(e.round == 1 for e in corrected)
    assert all(e.source == "demo: simulated annotator" for e in corrected)
    exported = read_volume(out)
    np.testing.assert_array_equal(exported.data, opened.final[...])
