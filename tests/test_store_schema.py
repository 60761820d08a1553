"""A project written by schema version 1, committed under tests/data, still opens."""

from pathlib import Path

import numpy as np

from napari_ssl_seg.store import SCHEMA_VERSION, Project

DATA = Path(__file__).parent / "data"


def test_schema_v1_project_opens(tmp_path):
    import shutil

    # Work on a copy: opening may replay the edit log, and the fixture must stay pristine.
    path = shutil.copytree(DATA / "project_v1.zarr", tmp_path / "project_v1.zarr")
    image = np.load(DATA / "project_v1_image.npy")
    project = Project.open(path, image=image)
    assert SCHEMA_VERSION >= 1
    assert project.annotated_slices() == [0, 1] and project.corrected_slices() == [2]
    assert project.latest_round == 1 and project.voxel_size == (1.0, 0.5, 0.5)
    merged = project.merged_labels()
    assert merged[1, 4:9, 4:9].all() and merged[2, 10:12, 10:12].all()
    assert not merged[2, 2:6, 2:6].any()  # the corrected slice overrides the round's labels
    assert [e.kind for e in project.edits()] == ["annotation", "annotation", "correction"]
