"""Where the wall time of a leave-one-out round goes: runs `domgen leave-one-out` under cProfile in an empty folder.

Prints the cumulative seconds of each stage (training, prediction, resizing to the original size, metrics with
MONAI surface distances, overlays, NIfTI, MLflow logging, data generation/reading/preprocessing) and their share of
the wall time. The stages are disjoint call sites, so their sum is close to the wall time; "other" is the rest.
Every argument after ``--`` goes to `domgen leave-one-out` (e.g. ``--source A --set train.epochs=2``).

    python benchmarks/profile_round.py --out /tmp/profile -- --source A --quiet
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path

# (stage, module path suffix, function name): cumulative time of these call sites; nested stages are subtracted
STAGES = [
    ("generate synthetic suite", "domgen/data/synthetic.py", "write_suite"),
    ("read cases", "domgen/data/registry.py", "load_cases"),
    ("preprocess slices", "domgen/preprocessing/slices.py", "prepare_slices"),
    ("training (train)", "domgen/training/trainer.py", "train"),
    ("prediction at model size", "domgen/training/trainer.py", "predict_model_size"),
    ("resize to original size", "domgen/training/trainer.py", "to_original_size"),
    ("cut-off search", "domgen/evaluation/cutoff.py", "best_cutoff"),
    ("metrics (evaluate)", "domgen/evaluation/evaluate.py", "evaluate"),
    ("  of which MONAI surface metrics", "domgen/evaluation/metrics.py", "surface_metrics"),
    ("CI ranking", "domgen/methods/certainty.py", "ci_ranking"),
    ("overlays (matplotlib)", "domgen/evaluation/artifacts.py", "overlay_figure"),
    ("prediction NIfTI", "domgen/evaluation/artifacts.py", "write_prediction_niftis"),
    ("checkpoints", "domgen/evaluation/artifacts.py", "save_checkpoint"),
    ("MLflow: metrics", "domgen/tracking/mlflow_store.py", "log_metrics"),
    ("MLflow: artifacts", "domgen/tracking/mlflow_store.py", "log_artifact_file"),
    ("MLflow: artifacts", "mlflow/tracking/client.py", "log_artifacts"),
    ("MLflow: runs (start/find/end)", "domgen/tracking/mlflow_store.py", "start_or_resume_run"),
    ("MLflow: runs (start/find/end)", "domgen/tracking/mlflow_store.py", "find_run"),
    ("MLflow: runs (start/find/end)", "domgen/tracking/mlflow_store.py", "round_lookup"),
    ("MLflow: runs (start/find/end)", "mlflow/tracking/fluent.py", "start_run"),
    ("MLflow: runs (start/find/end)", "mlflow/tracking/fluent.py", "end_run"),
    ("MLflow: runs (start/find/end)", "domgen/tracking/mlflow_store.py", "log_config"),
    ("tables (report)", "domgen/reports/report.py", "leave_one_out_tables"),
]


def stage_seconds(stats: pstats.Stats) -> dict[str, float]:
    out: dict[str, float] = {}
    for (path, _line, name), (_cc, _nc, _tt, ct, callers) in stats.stats.items():
        for stage, suffix, func in STAGES:
            if name == func and path.replace(os.sep, "/").endswith(suffix):
                # only calls from outside the same function (no double counting of recursion)
                out[stage] = out.get(stage, 0.0) + ct
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="empty folder to run in (data and mlflow.db land here)")
    ap.add_argument("--top", type=int, default=25, help="also print this many functions by own time")
    ap.add_argument("args", nargs=argparse.REMAINDER)
    ns = ap.parse_args()
    args = [a for a in ns.args if a != "--"]
    ns.out.mkdir(parents=True, exist_ok=True)
    os.chdir(ns.out)
    from domgen.cli import main as cli

    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    try:
        cli.main(["leave-one-out", *args], standalone_mode=False)
    finally:
        profiler.disable()
    wall = time.perf_counter() - started
    profiler.dump_stats(str(ns.out / "round.prof"))
    stats = pstats.Stats(profiler)
    seconds = stage_seconds(stats)
    print(f"\nwall time {wall:.1f} s (profile: {ns.out / 'round.prof'})", file=sys.stderr)
    print(f"{'stage':<36} {'seconds':>8} {'share':>6}")
    counted = 0.0
    for stage in dict.fromkeys(s for s, _, _ in STAGES):
        if stage in seconds:
            print(f"{stage:<36} {seconds[stage]:8.1f} {seconds[stage] / wall:6.1%}")
            if not stage.startswith(" "):
                counted += seconds[stage]
    print(f"{'other':<36} {wall - counted:8.1f} {(wall - counted) / wall:6.1%}")
    print(f"\ntop {ns.top} functions by own time:")
    stats.sort_stats("tottime").print_stats(ns.top)


if __name__ == "__main__":
    main()
