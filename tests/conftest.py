"""Shared fixtures: a tiny synthetic suite on disk and a real MLflow SQLite store, both in tmp dirs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

TINY = {"A": 4, "B": 3, "C": 3, "D": 3, "tumour": 3, "effusion": 3}

# The longest files first (seconds of a 2-worker run, largest first). `--dist loadfile` hands each file, in collection
# order, to whichever worker is free: a long file collected last (alphabetically, test_tracking_server_faults or
# test_transfer) kept one worker busy for minutes while the other had nothing left. Longest first leaves short files
# for the end. A file not named here keeps its place after these; naming it is only about wall time, never results.
LONGEST_FIRST = ("test_family_executors.py", "test_interruptions.py", "test_compare.py", "test_real_data.py",
                 "test_executors.py", "test_tracking_server_faults.py", "test_export.py", "test_cross_validate.py",
                 "test_leave_one_out.py", "test_transfer.py", "test_bad_inputs.py", "test_benchmark.py",
                 "test_pseudolabel_analysis.py", "test_device_training.py", "test_stacked.py", "test_cli_errors.py",
                 "test_transfer_3d.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept


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
