"""Shared pytest fixtures. Tests run offline; real data only where LDM_COURSE_DATA points at it."""
import os
import pytest

os.environ.setdefault("LDM_COURSE_SCALE", "ci")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture
def no_data(tmp_path, monkeypatch):
    "An environment where no dataset exists locally and nothing can be downloaded."
    monkeypatch.delenv("LDM_COURSE_DATA", raising=False)
    monkeypatch.setenv("LDM_COURSE_CACHE", str(tmp_path / "cache"))
    import ldm_course.data as data
    monkeypatch.setattr(data, "DATASETS", {k: v.__class__(v.name, v.description, v.classes, v.load, None)
                                           for k, v in data.DATASETS.items()})
    return tmp_path
