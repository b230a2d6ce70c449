"""Check that MLflow's UI opens a domgen experiment on its training-runs table, with a headless-Chromium screenshot.

MLflow 3 shows an experiment in its GenAI view (traces, token usage) by default. domgen tags every experiment
``mlflow.experimentKind = custom_model_development`` (read where the UI has no GenAI / Model-training switch)
and prints UI addresses that pick the training-runs view (``domgen ui``; ``mlflow_store.ui_url``), which is
what the switch of MLflow 3.x follows. This script makes a throw-away store with two runs in a domgen
experiment, serves it with ``mlflow ui`` on 127.0.0.1, opens the address ``domgen ui`` prints in headless
Chromium, saves a screenshot and checks the rendered page lists the runs (exit 1 if it does not); it also
says whether the bare experiment address (no view in it) lists them.

    python docs/ui_screenshot.py --out mlflow-ui.png      # needs chromium (Debian: apt-get install chromium)
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

RUN_NAMES = ("fold 0 | A in-domain", "fold 1 | A in-domain")


def _browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    sys.exit("no Chromium found; install it (Debian/Ubuntu: apt-get install chromium)")


def _store(folder: Path) -> tuple[str, str]:
    from domgen.tracking import mlflow_store as store

    uri = store.configure(f"sqlite:///{folder / 'mlflow.db'}")
    exp_id = store.experiment_id("domgen-leave-one-out")
    for i, name in enumerate(RUN_NAMES):
        with store.tracked_run(exp_id, name, {"train": {"epochs": 1}}, store.tags(family="leave-one-out", fold=i)) as run:
            store.log_metrics(run.info.run_id, {"dsc": 0.5 + 0.1 * i})
    return uri, exp_id


def _serve(uri: str, port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                                "--port", str(port)], stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process
        except OSError:
            time.sleep(0.5)
    process.terminate()
    sys.exit(f"mlflow ui did not start; see {log}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("mlflow-ui.png"))
    parser.add_argument("--port", type=int, default=5057)
    args = parser.parse_args()
    browser = _browser()
    with tempfile.TemporaryDirectory(prefix="domgen-ui-") as tmp:
        folder = Path(tmp)
        uri, exp_id = _store(folder)
        server = _serve(uri, args.port, folder / "mlflow-ui.log")
        from domgen.tracking.mlflow_store import ui_url

        url = ui_url(f"http://127.0.0.1:{args.port}", exp_id)
        flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,900",
                 "--virtual-time-budget=20000", f"--user-data-dir={folder / 'profile'}"]
        try:
            subprocess.run([*flags, f"--screenshot={args.out.resolve()}", url], check=True, capture_output=True, timeout=180)
            dom = subprocess.run([*flags, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=180).stdout
            bare = subprocess.run([*flags, "--dump-dom", url.split("?")[0]], check=True, capture_output=True, text=True,
                                  timeout=180).stdout
        finally:
            server.terminate()
            server.wait(timeout=30)
    shown = [name for name in RUN_NAMES if name in dom]
    print(f"screenshot: {args.out} ({args.out.stat().st_size} bytes) of {url}")
    print(f"runs listed: {len(shown)}/{len(RUN_NAMES)} at the address domgen prints; "
          f"{sum(name in bare for name in RUN_NAMES)}/{len(RUN_NAMES)} at the bare experiment address")
    if len(shown) != len(RUN_NAMES):
        print("the experiment did not open on its runs table (GenAI view?)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
