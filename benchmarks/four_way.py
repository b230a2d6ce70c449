"""The four-way comparison (Wang et al.'s Multi-encoder transfer vs Enshaei et al.'s CI pseudo-labels) in one command.

Runs, in ``--out`` (data and ``mlflow.db`` land there; a re-run resumes every step):

1. ``domgen transfer --target SOURCE --pretrain multi`` (the profile's five strategies; ``--strategies
   multi-encoder`` is enough for the comparison; a finished round prints its tables again), unless ``--init-run``
   names a Multi-encoder fold run in that store; its fold-0 model starts the transferred round;
2. ``splits.json``: the leave-one-out profile's k-fold of SOURCE with the patients that model trained on moved from
   each test part into that fold's train part, so no patient it has seen is scored in-domain (``--init-run`` refuses
   such a round otherwise);
3. ``domgen leave-one-out --source SOURCE --set splits_file=splits.json`` without and with ``--init-run`` (settings
   (a)/(b) and (c)/(d): each round's baseline and enhanced phase);
4. ``domgen report --compare``, which prints the table of BENCHMARKS.md.

    python benchmarks/four_way.py --out /tmp/four-way
    python benchmarks/four_way.py --out /tmp/four-way -- --set train.epochs=30   # extra leave-one-out arguments
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def domgen(out: Path, *args: str) -> None:
    """Run one domgen command in ``out``; stop with its exit code if it fails (it has printed why)."""
    command = [sys.executable, "-m", "domgen.cli", *args]
    print("$ domgen " + " ".join(args), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command, cwd=out)
    print(f"  ({time.perf_counter() - start:.0f} s, exit {code})", flush=True)
    if code:
        sys.exit(code)


def multi_encoder_fold_run(source: str, fold: int) -> str | None:
    """The newest finished Multi-encoder run of ``fold`` on target ``source`` in the configured store, if any."""
    from domgen.tracking import mlflow_store as store

    experiment = store.get_experiment("domgen-transfer")
    if experiment is None:
        return None
    runs = store.runs_of(experiment.experiment_id, f"tags.`domgen.strategy` = 'multi-encoder' and tags.`domgen.fold` = '{fold}' "
                                                   f"and tags.`domgen.target` = '{source}'")
    return max(runs, key=lambda r: r.info.end_time or 0).info.run_id if runs else None


def comparison_splits(source: str, seen: set[str], patients: list[str], path: Path) -> Path:
    """The leave-one-out profile's folds of ``patients`` with every ``seen`` patient moved into the train parts."""
    from domgen.config import load_profile
    from domgen.families.leave_one_out import FAMILY, profile_folds
    from domgen.preprocessing.splits import train_on, write_splits
    from domgen.typed_config import typed

    cfg = typed(load_profile("leave_one_out", "quick"), FAMILY)
    return write_splits(path, train_on(profile_folds(cfg, patients), seen),
                        {"dataset": source, "seed": cfg.seed, "protocol": cfg.split.protocol,
                         "note": "the init run's train patients moved from test to train (benchmarks/four_way.py)"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder to run in (data and mlflow.db land here)")
    ap.add_argument("--source", default="A", help="the leave-one-out source, also the transfer target")
    ap.add_argument("--init-run", help="a Multi-encoder fold run in that store (default: fold 0 of a transfer round run here)")
    ap.add_argument("--strategies", help="the transfer round's --strategy list (default: the transfer profile's five, "
                                         "the round of BENCHMARKS.md; multi-encoder alone is enough for the comparison)")
    ap.add_argument("extra", nargs="*", help="after --: more `domgen leave-one-out` arguments for both rounds")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{out / 'mlflow.db'}"  # the store of every command below
    quiet = ["--quiet"]

    from domgen.tracking import mlflow_store as store

    store.configure()
    init_run = args.init_run
    if init_run is None:
        strategies = ["--strategy", args.strategies] if args.strategies else []
        domgen(out, "transfer", "--target", args.source, "--pretrain", "multi", *strategies, *quiet)
        init_run = multi_encoder_fold_run(args.source, 0)
        if init_run is None:
            sys.exit("the transfer round finished without a Multi-encoder fold-0 run; see its output above")

    from domgen.families.common import trained_patients

    seen = trained_patients(init_run).get(args.source, set())
    with store.artifact_dir() as tmp:
        parent = store.get_run(init_run, "--init-run").data.tags["mlflow.parentRunId"]
        transfer_folds = json.loads(store.download_artifact(parent, "splits.json", tmp).read_text())["folds"]
    patients = sorted({p for part in ("train", "val", "test") for p in transfer_folds[0][part]})
    splits = comparison_splits(args.source, seen, patients, out / "four_way_splits.json")
    print(f"init run {init_run} trained on {args.source} patients {', '.join(sorted(seen))}: "
          f"kept out of every test part in {splits}", flush=True)

    loo = ["leave-one-out", "--source", args.source, "--set", f"splits_file={splits}", *quiet, *args.extra]
    domgen(out, *loo)
    domgen(out, *loo, "--init-run", init_run)
    domgen(out, "report", "--compare", "--out", str(out / "reports"))


if __name__ == "__main__":
    main()
