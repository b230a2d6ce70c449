"""Every command of `domgen --help` refuses a wrong flag the same way: exit code 2, one line naming the flag (or the
wrong value it was given), no traceback, and nothing started: no MLflow store, no generated data."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from domgen.cli import main

SUITE = """
name: flags
datasets:
  X:
    format: nifti
    root: X
    images: imagesTr
    lesions: labelsTr
    intensity: hu
"""

# (command line, what the one line must name); {suite}, {file}: a suite YAML and an existing plain file
BAD_FLAGS = [
    (["data", "list", "--suite"], "--suite"),
    (["data", "list", "--suite", "nope.yaml"], "nope.yaml"),
    (["data", "check", "X", "--suite", "{suite}", "--lung-mask", "nope"], "--lung-mask"),
    (["data", "check", "X", "--suite", "{suite}", "--set", "train.epoch=3"], "train.epoch"),
    (["data", "check", "X", "--suite", "{suite}", "--profile", "nope"], "nope"),
    (["data", "fetch", "nope"], "nope"),
    (["data", "fetch", "medseg-100", "--dest", "{file}"], "--dest"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--scale", "0"], "--scale"),
    (["generate", "--seed", "abc"], "--seed"),
    (["leave-one-out", "--source", "A", "--folds", "0"], "--folds"),
    (["leave-one-out", "--source", "A", "--ci-quantile", "2"], "--ci-quantile"),
    (["leave-one-out", "--source", "A", "--top-fraction", "0"], "--top-fraction"),
    (["leave-one-out", "--source", "A", "--filter", "tta=high"], "--filter"),
    (["leave-one-out", "--source", "A", "--device", "gpu"], "--device"),
    (["leave-one-out"], "--source"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--seeds", "0"], "--seeds"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--ci-quantile", "1.5"], "--ci-quantile"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--confidence", "nope"], "--confidence"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--filter", "bogus=0.9"], "--filter"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--size-strata", "1"], "--size-strata"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--min-pixels-at", "0"], "--min-pixels-at"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--per-patient-max", "0"], "--per-patient-max"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--min-patients", "0"], "--min-patients"),
    (["pseudolabel", "--target", "B", "--checkpoint", "{file}", "--ci-min", "1.2"], "--ci-min"),
    (["confidence", "--target", "B", "--checkpoint", "{file}", "--top-k", "0"], "--top-k"),
    (["confidence", "--target", "B", "--checkpoint", "{file}", "--device", "gpu"], "--device"),
    (["transfer", "--folds", "1"], "--folds"),
    (["transfer", "--dims", "4"], "--dims"),
    (["transfer", "--strategy", "nope"], "--strategy"),
    (["benchmark", "--archs", "nope"], "--archs"),
    (["benchmark", "--encoders", "nope"], "--encoders"),
    (["benchmark", "--experiments", "nope"], "--experiments"),
    (["benchmark", "--stack", "0"], "--stack"),
    (["benchmark", "--stack", "2"], "--stack"),
    (["cross-validate", "--folds", "1"], "--folds"),
    (["cross-validate", "--sampler", "nope"], "--sampler"),
    (["cross-validate", "--encoder-weights", "imagenet"], "--encoder-weights"),
    (["export", "some-run", "--format", "zip"], "--format"),
    (["export"], "--sweep"),
    (["export", "--sweep", "some-sweep"], "--out"),
    (["report", "--experiment", "nope"], "--experiment"),
    (["report", "--paper-table", "{file}"], "--paper-table"),
    (["report", "--experiment", "domgen-benchmark", "--against-paper", "--paper-table", "missing.csv"], "--paper-table"),
    (["compare", "--sources", "A", "--methods", "nope"], "--methods"),
    (["compare", "--sources", "A", "--methods", "erm", "--selection", "best"], "--selection"),
    (["compare", "--sources", "A", "--methods", "erm", "--seeds", "0"], "--seeds"),
    (["ui", "--port", "0"], "--port"),
    (["ui", "--port", "70000"], "--port"),
]


@pytest.fixture
def place(tmp_path, monkeypatch):
    """A working folder with a suite and a plain file; every store a command could open points into it."""
    (tmp_path / "suite.yaml").write_text(SUITE)
    (tmp_path / "plain.txt").write_text("not a folder, not a checkpoint\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.setenv("DOMGEN_DATA", str(tmp_path / "generated"))
    return tmp_path


def _nothing_started(place: Path) -> None:
    left = sorted(p.name for p in place.iterdir())
    assert left == ["plain.txt", "suite.yaml"], left  # no mlflow.db, mlruns/ or generated data


@pytest.mark.parametrize("args,names", BAD_FLAGS, ids=[" ".join(a) for a, _ in BAD_FLAGS])
def test_bad_flag_is_one_line_and_starts_nothing(place, args, names):
    args = [a.format(suite=place / "suite.yaml", file=place / "plain.txt") for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit), result.exception
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert names in lines[0], lines[0]
    _nothing_started(place)


def test_every_command_has_rows_in_the_table():
    """The table above covers every command `domgen --help` lists, with at least two wrong flags each."""
    expected = set()
    for name, cmd in main.commands.items():
        expected |= {f"{name} {sub}" for sub in cmd.commands} if hasattr(cmd, "commands") else {name}
    counted = {}
    for args, _ in BAD_FLAGS:
        key = " ".join(args[:2]) if args[0] == "data" else args[0]
        counted[key] = counted.get(key, 0) + 1
    assert set(counted) == expected
    assert all(n >= 2 for n in counted.values()), counted


def test_through_the_console_script(place):
    """The real entry point: exit status 2, one line on stderr, nothing on stdout, no store."""
    proc = subprocess.run([sys.executable, "-m", "domgen.cli", "pseudolabel", "--target", "B", "--checkpoint", "plain.txt",
                           "--seeds", "0"], capture_output=True, text=True, cwd=place,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and proc.stderr.strip().count("\n") == 0 and "--seeds" in proc.stderr, proc.stderr
    _nothing_started(place)
