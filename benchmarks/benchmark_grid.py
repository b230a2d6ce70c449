"""Measurements for the benchmark family (issue 5); prints the figures.

    python benchmarks/benchmark_grid.py smoke   [--workers 2] [--out DIR]   # every arch x encoder x weights, one short training each
    python benchmarks/benchmark_grid.py compare [--workers 2] [--out DIR]   # local vs Ray executor, same sweep, same seeds
    python benchmarks/benchmark_grid.py project [--device cpu|cuda] [--encoders ...]  # paper-profile cost from measured seconds per epoch

Set DOMGEN_THREADS / --threads for the torch threads per trial; HF_HUB_OFFLINE=1 makes offline ImageNet
configurations fail at once instead of after Hugging Face's retries.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from domgen.config import apply_overrides, load_profile  # noqa: E402
from domgen.families import benchmark as bm  # noqa: E402
from domgen.tracking import mlflow_store as store  # noqa: E402


def quick_cfg(threads: int, *overrides: str) -> dict:
    return apply_overrides(load_profile("benchmark", "quick"), ["train.epochs=1", f"threads={threads}", "save_checkpoint=false", *overrides])


def configuration_runs(uri: str) -> list:
    store.configure(uri)
    exp = MlflowClient().get_experiment_by_name(bm.EXPERIMENT)
    return store.runs_of(exp.experiment_id, "tags.`domgen.role` = 'configuration'", status=None) if exp else []


def smoke(args) -> None:
    """All 4 architectures x 25 encoders x 2 weights (= 200) of one experiment, one epoch each, quick profile."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{out.resolve()}/mlflow.db"
    cfg = bm.resolve(quick_cfg(args.threads), experiments=args.experiment, encoders=args.encoders)
    store.configure(uri)
    started = time.perf_counter()
    result = bm.run_benchmark(cfg, workers=args.workers, progress=True)
    wall = time.perf_counter() - started
    runs = configuration_runs(uri)
    finished = [r for r in runs if r.info.status == "FINISHED"]
    failed = [r for r in runs if r.info.status != "FINISHED"]
    reasons: dict[str, int] = {}
    for r in failed:
        reason = r.data.tags.get("domgen.error", "?")
        key = "no ImageNet weights offline" if "imagenet weights" in reason else reason[:120]
        reasons[key] = reasons.get(key, 0) + 1
    per_run = [(r.info.end_time - r.info.start_time) / 1000 for r in finished]
    print(f"\nsmoke: {len(bm.expand_grid(cfg))} configurations ({args.experiment}), {args.workers} workers x {args.threads} thread(s), "
          f"{os.cpu_count()} cores, {platform.processor() or platform.machine()}")
    print(f"wall time {wall:.0f} s; built and trained {len(finished)}; failed {len(failed)}; this call ran {result.finished}, found {result.skipped} done")
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  failed x{n}: {reason}")
    if per_run:
        print(f"seconds per trained configuration: median {np.median(per_run):.1f}, max {max(per_run):.1f}, sum {sum(per_run):.0f}")
        slowest = sorted(finished, key=lambda r: r.info.start_time - r.info.end_time)[:5]
        print("slowest: " + ", ".join(f"{r.data.tags['domgen.arch']}/{r.data.tags['domgen.encoder']} "
                                      f"{(r.info.end_time - r.info.start_time) / 1000:.0f}s" for r in slowest))


def compare(args) -> None:
    """The same small sweep on the local and the Ray executor, each logging to its own `mlflow server`."""
    from domgen.data.synthetic import ensure_synthetic_suite
    from domgen.executors.ray_executor import tracking_server

    out = Path(args.out)
    suite = ensure_synthetic_suite(out / "suite", patients={"A": 0, "B": 0, "tumour": 0, "effusion": 0})
    grid = {"experiments": "lesion-b", "archs": "pspnet,linknet", "encoders": "resnet18,mobilenet_v2", "weights": "random"}
    cfg = bm.resolve(quick_cfg(args.threads, f"suite={suite}", "train.epochs=2"), **grid)
    results = {}
    for executor in ("local", "ray"):
        folder = (out / executor).resolve()
        with tracking_server(f"sqlite:///{folder}/mlflow.db", folder / "artifacts") as url:
            store.configure(url)
            started = time.perf_counter()
            bm.run_benchmark(cfg, executor=executor, workers=args.workers, progress=False)
            wall = time.perf_counter() - started
            runs = configuration_runs(url)
            results[executor] = (wall, {(r.data.tags["domgen.arch"], r.data.tags["domgen.encoder"]): r.data.metrics for r in runs})
    print(f"\ncompare: {len(bm.expand_grid(cfg))} configurations, 2 epochs, {args.workers} workers x {args.threads} thread(s)")
    for executor, (wall, _) in results.items():
        print(f"  {executor:5s} wall time {wall:.1f} s")
    worst = 0.0
    for key, metrics in results["local"][1].items():
        other = results["ray"][1][key]
        diff = max(abs(metrics[m] - other[m]) for m in ("dice", "sens", "spec", "best_val_loss"))
        worst = max(worst, diff)
        print(f"  {key[0]}/{key[1]}: dice local {metrics['dice']:.6f} ray {other['dice']:.6f}; largest metric difference {diff:.2e}")
    print(f"  largest difference over all metrics: {worst:.2e}")


def project(args) -> None:
    """Seconds per epoch at the paper's size (512x512, batch 2, 80 train + 20 validation slices), measured on a
    sample of architecture x encoder pairs, projected to 600 configurations x 200 epochs."""
    from domgen.models import ARCHITECTURES, build_model
    from domgen.training.trainer import LOSSES, train_step

    torch.set_num_threads(args.threads)
    device = args.device
    paper = load_profile("benchmark", "paper")
    size, batch, epochs = paper["preprocessing"]["image_size"], paper["train"]["batch_size"], paper["train"]["epochs"]
    steps, val_batches = 80 // batch, 20 // batch
    rows = []
    for encoder in args.encoders.split(","):
        for arch in ARCHITECTURES:
            model = build_model(arch, encoder, "none", 1).to(device)
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
            loss = LOSSES["soft-dice"]()
            x = torch.randn(batch, 1, size, size, device=device)
            y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
            model.train()
            train_step(model, optimizer, loss, x, y)  # warm-up (allocations, cuDNN choice)
            times = []
            for _ in range(args.steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                train_step(model, optimizer, loss, x, y)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            model.eval()
            with torch.no_grad():
                t = time.perf_counter()
                model(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                val = time.perf_counter() - t
            epoch = steps * float(np.median(times)) + val_batches * val
            rows.append((arch, encoder, epoch))
            print(f"  {arch:8s} {encoder:16s} {np.median(times):7.3f} s/step  -> {epoch:8.1f} s/epoch", flush=True)
            del model, optimizer
    mean_epoch = float(np.mean([r[2] for r in rows]))
    hours = mean_epoch * epochs * 600 / 3600
    unit = "GPU-hours" if device == "cuda" else f"CPU-hours on {torch.get_num_threads()} thread(s)"
    name = torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())
    print(f"\nproject: {len(rows)} sampled pairs on {device} ({name}); mean {mean_epoch:.1f} s/epoch at {size}x{size}, batch {batch}, "
          f"{steps} steps + {val_batches} validation batches")
    print(f"paper profile: 600 configurations x {epochs} epochs x {mean_epoch:.1f} s = {hours:,.0f} {unit} "
          f"(test inference, model building and logging not counted)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["smoke", "compare", "project"])
    parser.add_argument("--out", default="benchmark-runs")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("DOMGEN_THREADS", 1)))
    parser.add_argument("--experiment", default="lesion-a")
    parser.add_argument("--encoders", default=None, help="smoke: a subset (default all 25); project: the sample")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.what == "project" and not args.encoders:
        args.encoders = "mobilenet_v2,resnet34,efficientnet-b0"
    {"smoke": smoke, "compare": compare, "project": project}[args.what](args)


if __name__ == "__main__":
    main()
