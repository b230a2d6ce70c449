"""Bad input reaches the user as one sentence naming the file, exit code 2, no traceback."""
from __future__ import annotations

import gzip
import os
import contextlib
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from domgen.cli import main

SUITE = """
name: bad
datasets:
  X:
    format: nifti
    root: X
    images: imagesTr
    lesions: labelsTr
    intensity: hu
    lesion_labels: {1: lesion}
"""


def _nifti(path: Path, data: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)


def _dataset(tmp_path: Path, image=None, mask=None) -> Path:
    image = np.full((16, 16, 3), -800, np.float32) if image is None else image
    mask = np.zeros((16, 16, 3), np.uint8) if mask is None else mask
    _nifti(tmp_path / "X" / "imagesTr" / "p1.nii.gz", image)
    _nifti(tmp_path / "X" / "labelsTr" / "p1.nii.gz", mask)
    suite = tmp_path / "suite.yaml"
    suite.write_text(SUITE)
    return suite


def _check(suite: Path, name: str = "X"):
    return CliRunner().invoke(main, ["data", "check", name, "--suite", str(suite)])


def _assert_clean_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in result.output


def test_good_dataset_checks(tmp_path):
    result = _check(_dataset(tmp_path))
    assert result.exit_code == 0 and "patients" in result.output and "1" in result.output


def test_truncated_nifti(tmp_path):
    suite = _dataset(tmp_path)
    path = tmp_path / "X" / "imagesTr" / "p1.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    _assert_clean_error(_check(suite), "p1.nii.gz")


def test_corrupt_nifti(tmp_path):
    suite = _dataset(tmp_path)
    (tmp_path / "X" / "labelsTr" / "p1.nii.gz").write_bytes(gzip.compress(b"not a nifti at all" * 20))
    _assert_clean_error(_check(suite), "p1.nii.gz")


def test_shape_mismatch(tmp_path):
    _assert_clean_error(_check(_dataset(tmp_path, mask=np.zeros((16, 15, 3), np.uint8))), "p1.nii.gz")


def test_mask_values_outside_labels(tmp_path):
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[2, 2, 1] = 7
    _assert_clean_error(_check(_dataset(tmp_path, mask=mask)), "p1.nii.gz", "7")


def test_nan_voxels(tmp_path):
    image = np.full((16, 16, 3), -800, np.float32)
    image[3, 3, 0] = np.nan
    _assert_clean_error(_check(_dataset(tmp_path, image=image)), "p1.nii.gz")


def test_empty_folder(tmp_path):
    suite = _dataset(tmp_path)
    for f in (tmp_path / "X").rglob("*.nii.gz"):
        f.unlink()
    _assert_clean_error(_check(suite), "imagesTr")


def test_unknown_dataset_and_missing_suite_key(tmp_path):
    suite = _dataset(tmp_path)
    _assert_clean_error(_check(suite, "Nope"), "Nope", "X")
    broken = tmp_path / "broken.yaml"
    broken.write_text(SUITE.replace("    format: nifti\n", ""))
    _assert_clean_error(_check(broken), "broken.yaml", "format")
    _assert_clean_error(_check(tmp_path / "missing.yaml"), "missing.yaml")


def test_run_flags_and_profiles(tmp_path, tiny_suite):
    runner = CliRunner()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    result = runner.invoke(main, ["leave-one-out", "--source", "Nope", "--suite", str(tiny_suite), "--tracking-uri", uri, "--quiet"])
    _assert_clean_error(result, "Nope")
    result = runner.invoke(main, ["leave-one-out", "--source", "A", "--profile", "nope", "--tracking-uri", uri])
    _assert_clean_error(result, "nope")
    result = runner.invoke(main, ["leave-one-out", "--source", "A", "--set", "train.epoch=3", "--tracking-uri", uri])
    _assert_clean_error(result, "epoch")
    result = runner.invoke(main, ["pseudolabel", "--target", "B", "--checkpoint", str(tmp_path / "none.pt"), "--tracking-uri", uri])
    _assert_clean_error(result, "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage")
    result = runner.invoke(main, ["pseudolabel", "--target", "B", "--checkpoint", str(junk), "--tracking-uri", uri])
    _assert_clean_error(result, "junk.pt")


def test_offline_imagenet_weights_say_what_to_do(tmp_path, monkeypatch):
    """No network: asking for ImageNet weights fails in one sentence naming the alternatives."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    # huggingface_hub reads HF_HUB_OFFLINE when it is imported: if an earlier test imported it, set its constant too
    # (otherwise this test waits for a network timeout instead of checking the offline sentence)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    from domgen.errors import DomgenError
    from domgen.models import build_model

    with pytest.raises(DomgenError, match="--encoder-weights none"):
        build_model("linknet", "resnet18", "imagenet")


def test_exit_code_through_the_console_script(tmp_path):
    """The installed entry point itself: exit status 2 and a single line on stderr."""
    proc = subprocess.run([sys.executable, "-m", "domgen.cli", "data", "check", "A", "--suite", str(tmp_path / "nope.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error:") and "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_ignore_labels_turn_medseg_effusion_into_background(tmp_path):
    """MedSeg stores pleural effusion as 3; `ignore_labels: [3]` reads it as background, not as a lesion."""
    from domgen.data.registry import load_cases, load_suite

    mask = np.zeros((16, 16, 3), np.uint8)
    mask[2, 2, 0], mask[5, 5, 1], mask[6, 6, 2] = 1, 2, 3
    suite = _dataset(tmp_path, mask=mask)
    _assert_clean_error(_check(suite), "3")  # not declared: refused, naming the value
    suite.write_text(SUITE.replace("lesion_labels: {1: lesion}", "lesion_labels: {1: ground_glass, 2: consolidation}\n    ignore_labels: [3]"))
    case = load_cases(load_suite(str(suite)).get("X"))[0]
    assert sorted(np.unique(case.lesion).tolist()) == [0, 1, 2]
    assert int((case.lesion > 0).sum()) == 2


def test_data_list_names_every_public_dataset(tmp_path):
    from domgen.data.fetch import PUBLIC_DATASETS

    result = CliRunner().invoke(main, ["data", "list"])
    assert result.exit_code == 0, result.output
    for key in PUBLIC_DATASETS:
        assert key in result.output


def test_device_cuda_without_a_gpu_is_one_sentence(tmp_path, tiny_suite):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = CliRunner().invoke(main, ["leave-one-out", "--source", "A", "--suite", str(tiny_suite), "--device", "cuda",
                                       "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    _assert_clean_error(result, "--device cuda", "--device cpu")
    assert not (tmp_path / "mlflow.db").exists()  # nothing was started


def test_ui_serves_the_store_on_loopback_and_sigterm_leaves_no_child(tmp_path):
    """`domgen ui` starts the MLflow UI on 127.0.0.1 for the given store, without MLflow's job runner; its health endpoint
    answers; SIGTERM to domgen ends every process it started."""
    import signal
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "domgen.cli", "ui", "--port", str(port),
                             "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True)
    children = []
    try:
        deadline, body = time.monotonic() + 120, b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                time.sleep(1)
        assert body.strip() == b"OK", proc.stdout.read1() if proc.poll() is not None else "no answer in 120 s"
        children = _descendants(proc.pid)
        assert children, "domgen ui started no MLflow process"
        assert not any("huey" in cmd for cmd in children.values())  # no GenAI job runner workers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in children):
            time.sleep(0.5)
        assert not [cmd for pid, cmd in children.items() if _alive(pid)], "left running after SIGTERM"
    finally:
        for pid in [proc.pid, *children]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _descendants(pid: int) -> dict[int, str]:
    """{pid: command line} of every process below ``pid`` (from /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in found:
                with contextlib.suppress(OSError):
                    found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                frontier.append(child)
    return found


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_table2_in_domain_row_shows_a_dash_where_it_has_no_change():
    """The in-domain row has no before/after change: its change cells print '-', never 'nan'; the rest is untouched."""
    from domgen.reports.report import table2_frame, to_markdown

    indomain = {"source": "A", "test set": "A (in-domain)", "DSC before": "0.700", "DSC after": "-", "in-domain DSC after": "-",
                "CI-DSC Spearman": "0.400", "pseudo-labels": "-", "note": ""}
    unseen = {"source": "A", "test set": "B", "DSC before": "0.500", "DSC after": "0.550", "in-domain DSC after": "0.690",
              "CI-DSC Spearman": "0.300", "pseudo-labels": "12 of 40", "DSC change [95 % CI]": "+0.050 [+0.010, +0.090]",
              "Wilcoxon p": "0.031", "change over seeds x folds": "+0.040", "note": ""}
    text = to_markdown(table2_frame([indomain, unseen]))
    assert text.splitlines() == [
        "| source | test set | DSC before | DSC after | in-domain DSC after | CI-DSC Spearman | pseudo-labels | note | "
        "DSC change [95 % CI] | Wilcoxon p | change over seeds x folds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        "| A | A (in-domain) | 0.700 | - | - | 0.400 | - |  | - | - | - |",
        "| A | B | 0.500 | 0.550 | 0.690 | 0.300 | 12 of 40 |  | +0.050 [+0.010, +0.090] | 0.031 | +0.040 |",
    ]
