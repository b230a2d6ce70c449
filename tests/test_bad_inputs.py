"""A table of bad inputs, as a new user would type them, through the ``domgen`` command.

Each must end as exit code 2 with one line on stderr and no traceback, and leave no new file in the working
folder and no new MLflow run in the store. Every row runs through the command's entry point in this process
(click's runner: seconds for the table); the rows of issue 10's table, and with ``DOMGEN_TEST_EVERY_ROW_IN_A_PROCESS=1``
every row, also run as the installed command in a process of their own (each pays torch's import).
"""
from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from domgen.cli import main
from domgen.tracking import mlflow_store as store
from stores import sqlite_store

# the rows of the issue's table (and one per family), also run as separate processes
ISSUE_ROWS = {"epochs not a number", "image size smp cannot take", "unknown loss", "DOMGEN_THREADS not a number",
              "report of an unknown run", "ci-min above 1", "top-k negative", "unreachable tracking server",
              "image size linknet cannot take"}


def _rows(suite: Path, bad: dict[str, Path]) -> list[tuple[str, list[str], dict, str]]:
    """(name, arguments, extra environment, a word the sentence must contain)."""
    s = ["--suite", str(suite)]
    loo = ["leave-one-out", "--source", "A", *s, "--quiet"]
    tr = ["transfer", *s, "--quiet"]
    bm = ["benchmark", *s, "--quiet", "--archs", "unet", "--encoders", "resnet18", "--weights", "random", "--experiments", "lung"]
    return [
        ("epochs not a number", [*loo, "--set", "train.epochs=abc"], {}, "train.epochs"),
        ("image size smp cannot take", [*loo, "--set", "preprocessing.image_size=100"], {}, "multiple of 32"),
        ("unknown loss", [*loo, "--set", "train.loss=foo"], {}, "train.loss"),
        ("unknown normalisation", [*loo, "--set", "preprocessing.normalisation=foo"], {}, "normalisation"),
        ("DOMGEN_THREADS not a number", loo, {"DOMGEN_THREADS": "abc"}, "DOMGEN_THREADS"),
        ("DOMGEN_THREADS zero", tr, {"DOMGEN_THREADS": "0"}, "DOMGEN_THREADS"),
        ("ci-min above 1", [*loo, "--ci-min", "1.5"], {}, "--ci-min"),
        ("top-k negative", [*loo, "--top-k", "-3"], {}, "--top-k"),
        ("unknown source", ["leave-one-out", "--source", "Z", *s], {}, "'Z'"),
        ("unknown profile", ["leave-one-out", "--source", "A", "--profile", "nosuch"], {}, "nosuch"),
        ("unknown key", [*loo, "--set", "train.lossx=1"], {}, "lossx"),
        ("negative learning rate", [*loo, "--set", "train.lr=-1"], {}, "train.lr"),
        ("split fractions not summing to 1", [*loo, "--set", "split.val=0.5"], {}, "not 1"),
        ("missing init checkpoint", [*loo, "--init-checkpoint", "/nonexistent/model.pt"], {}, "init_checkpoint"),
        ("bool given as text", [*loo, "--set", "preprocessing.mask_to_lung=maybe"], {}, "mask_to_lung"),
        ("unknown lung-mask provider", [*loo, "--lung-mask", "foo"], {}, "--lung-mask"),
        ("cut-off candidate above 1", [*loo, "--set", "evaluation.cutoff_candidates=[1.5]"], {}, "cutoff_candidates"),
        ("pseudolabel flags out of range", ["pseudolabel", "--target", "B", "--run-id", "x", "--ci-min", "1.5"], {}, "--ci-min"),
        ("unknown strategy", [*tr, "--strategy", "foo"], {}, "strategies"),
        ("unknown pretrained model", [*tr, "--pretrain", "foo"], {}, "--pretrain foo"),
        ("unknown architecture", [*tr, "--arch", "foo"], {}, "--arch"),
        ("batch size zero", [*tr, "--set", "train.batch_size=0"], {}, "batch_size"),
        ("unreachable tracking server", [*tr, "--tracking-uri", "http://127.0.0.1:1"], {}, "does not answer"),
        ("unknown architecture in a grid", [*bm[:-8], "--archs", "Unet,foo"], {}, "'foo'"),
        ("unknown encoder", [*bm[:-6], "--encoders", "nosuch", "--weights", "random", "--experiments", "lung"], {}, "nosuch"),
        ("zero workers", [*bm, "--workers", "0"], {}, "--workers"),
        ("image size linknet cannot take", [*bm[:-8], "--archs", "Linknet", "--set", "preprocessing.image_size=48"], {}, "multiple of 32"),
        ("threshold above 1", [*bm, "--set", "evaluation.threshold=2"], {}, "threshold"),
        ("report of an unknown run", ["report", "--run-id", "deadbeef"], {}, "deadbeef"),
        ("report of an unknown experiment", ["report", "--experiment", "nosuch"], {}, "nosuch"),
        ("export of an unknown run", ["export", "deadbeef"], {}, "deadbeef"),
        ("pseudolabel from an unknown run", ["pseudolabel", "--target", "B", "--run-id", "deadbeef"], {}, "deadbeef"),
        ("profile with an unknown key", ["leave-one-out", "--source", "A", *s, "--profile", str(bad["unknown_key"])], {}, "colour"),
        ("profile that is not YAML", ["leave-one-out", "--source", "A", *s, "--profile", str(bad["not_yaml"])], {}, "YAML"),
        ("NIfTI reader: truncated image", [*tr, "--suite", str(bad["nifti"]), "--target", "A"], {}, ".nii"),
        ("DICOM reader: corrupt slice", [*tr, "--suite", str(bad["dicom"]), "--target", "B", "--strategy", "scratch"], {}, ".dcm"),
        ("PNG slice reader: corrupt slice", [*tr, "--suite", str(bad["slices"]), "--target", "D", "--strategy", "scratch"], {}, ".png"),
        ("suite file missing", [*tr, "--suite", "/nonexistent/suite.yaml"], {}, "suite.yaml"),
    ]


def _copy_suite(tiny_suite: Path, dest: Path, corrupt) -> Path:
    shutil.copytree(tiny_suite.parent, dest)
    corrupt(dest)
    return dest / tiny_suite.name


def _first(folder: Path, pattern: str) -> Path:
    return sorted(folder.rglob(pattern))[0]


@pytest.fixture(scope="module")
def bad_files(tiny_suite, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bad")
    unknown_key = root / "colour.yaml"
    text = (Path(__file__).parents[1] / "experiments" / "leave_one_out" / "quick.yaml").read_text()
    unknown_key.write_text(text + "colour: blue\n")
    not_yaml = root / "broken.yaml"
    not_yaml.write_text("train: [epochs: 3\n")

    def truncate(path: Path) -> None:
        blob = path.read_bytes()
        path.write_bytes(blob[: len(blob) // 3])

    return {"unknown_key": unknown_key, "not_yaml": not_yaml,
            "nifti": _copy_suite(tiny_suite, root / "nifti", lambda d: truncate(_first(d / "A" / "imagesTr", "*.nii.gz"))),
            "dicom": _copy_suite(tiny_suite, root / "dicom", lambda d: _first(d / "B", "*.dcm").write_bytes(b"not a dicom" * 10)),
            "slices": _copy_suite(tiny_suite, root / "slices", lambda d: _first(d / "D" / "images", "*.png").write_bytes(b"\x89PNG junk"))}


def _run_count(db: Path) -> int:
    with sqlite3.connect(db) as con:
        return con.execute("select count(*) from runs").fetchone()[0]


def _listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.name != "mlflow.db"}


def _store(work: Path) -> tuple[Path, str]:
    db = work / "mlflow.db"
    uri = sqlite_store(db)
    store.configure(uri)
    store.experiment_id("domgen-leave-one-out")  # an existing store, so report / export / pseudolabel reach the run lookup
    return db, uri


def _verdict(name: str, word: str | None, code: int, stderr: str) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    print(f"{name:45s} exit {code}  {lines[-1] if lines else ''}")
    if code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr and (word is None or word in lines[0]):
        return None
    return f"{name}: exit {code}, stderr: {stderr[-600:]}"


def test_bad_inputs_end_in_one_sentence_and_leave_nothing(tiny_suite, bad_files, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    db, uri = _store(work)
    runs_before, files_before = _run_count(db), _listing(work)
    rows = _rows(tiny_suite, bad_files)
    assert len(rows) >= 20
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    problems = []
    for name, args, env, word in rows:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            args = args if "--tracking-uri" in args else [*args, "--tracking-uri", uri]
            result = CliRunner().invoke(main, args)
        problems.append(_verdict(name, word, result.exit_code, result.stderr + (repr(result.exception) if result.exit_code not in (0, 2) else "")))
    assert not [p for p in problems if p], "\n".join(p for p in problems if p)
    assert _run_count(db) == runs_before
    assert _listing(work) == files_before


def test_bad_inputs_through_the_installed_command(tiny_suite, bad_files, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    db, uri = _store(work)
    runs_before, files_before = _run_count(db), _listing(work)
    every = os.environ.get("DOMGEN_TEST_EVERY_ROW_IN_A_PROCESS") == "1"
    rows = [row for row in _rows(tiny_suite, bad_files) if every or row[0] in ISSUE_ROWS]

    def run(row):
        name, args, env, word = row
        if "--tracking-uri" not in args:
            args = [*args, "--tracking-uri", uri]
        proc = subprocess.run([sys.executable, "-m", "domgen.cli", *args], cwd=work, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
        return _verdict(name, word, proc.returncode, proc.stderr)

    with ThreadPoolExecutor(2) as pool:
        problems = [p for p in pool.map(run, rows) if p]
    assert not problems, "\n".join(problems)
    assert _run_count(db) == runs_before
    assert _listing(work) == files_before
