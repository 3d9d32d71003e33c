"""Shared pytest fixtures: every test gets its own cache root, and real data is found (or skipped) in one place."""
import os
import pytest
from ullsam_nb.basics import shared_data_dir

@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    "Each test writes caches to a fresh folder, never to the user's ~/.cache."
    monkeypatch.setenv("ULLSAM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    monkeypatch.setenv("MPLBACKEND", "Agg")

@pytest.fixture
def real_data():
    "The workspace's real labelled data folder (shared/data), or skip."
    d = shared_data_dir()
    if d is None: pytest.skip("shared/data (real microscopy) is not present")
    return d
