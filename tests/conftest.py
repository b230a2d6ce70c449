"""Shared fixtures: a tiny synthetic suite on disk and a real MLflow SQLite store, both in tmp dirs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TINY = {"A": 4, "B": 3, "C": 3, "D": 3, "tumour": 3, "effusion": 3}


@pytest.fixture(scope="session")
def tiny_suite(tmp_path_factory) -> Path:
    """The synthetic suite at test size: a few patients of 4 slices per site (written once per session)."""
    from domgen.data.synthetic import ensure_synthetic_suite

    return ensure_synthetic_suite(tmp_path_factory.mktemp("data") / "synthetic", patients=TINY, slices_per_patient=4)


@pytest.fixture
def tracking_uri(tmp_path) -> str:
    from domgen.tracking import mlflow_store as store

    from stores import sqlite_store

    return store.configure(sqlite_store(tmp_path / "mlflow.db"))
