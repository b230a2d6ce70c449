"""The ``domgen`` command line. Every user mistake ends as one sentence on stderr and exit code 2."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import click
import numpy as np

from domgen import interrupts
from domgen.errors import DomgenError

DEVICE = click.Choice(["cpu", "cuda"])


class DomgenGroup(click.Group):
    """Turns DomgenError into ``error: <sentence>`` and exit code 2, with no traceback; Ctrl-C and SIGTERM into
    ``interrupted`` and exit code 130 (the current run is marked interrupted, a plain re-run resumes)."""

    def invoke(self, ctx):
        # SIGTERM (`timeout`, a scheduler, `kill`) ends the work like Ctrl-C: the current run is marked interrupted
        previous = interrupts.install() if ctx.parent is None else None
        try:
            return super().invoke(ctx)
        except DomgenError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except click.UsageError as exc:
            if isinstance(exc, click.exceptions.NoArgsIsHelpError):
                raise
            # a flag click itself refuses (not a number, not a choice, missing) is one line too, like every other mistake
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: finished runs are kept in MLflow; re-run the same command to resume", err=True)
            sys.exit(130)
        except Exception as exc:
            from domgen.tracking.mlflow_store import tracking_error

            sentence = tracking_error(exc)
            if sentence is None:
                raise
            click.echo(f"error: {sentence}", err=True)
            sys.exit(2)
        finally:
            if previous is not None:
                interrupts.restore(previous)


@click.group(cls=DomgenGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="domgen")
def main():
    """Domain-generalisation experiments for COVID-19 lesion segmentation on chest CT.

    \b
    Families:  leave-one-out / pseudolabel   (Enshaei et al., Certainty-Index pseudo-labels)
               transfer                     (Wang et al., non-COVID lesions, Multi-encoder)
               benchmark / export           (Bizopoulos et al., the 600-model grid)
    Tracking:  MLflow, by default ./mlflow.db; browse with `domgen ui`.
    Data:      `domgen data list`; the default suite `synthetic` is generated on first use.
    """


def _threads(device: str) -> None:
    import torch

    from domgen.settings import environment

    threads = environment("DOMGEN_THREADS")
    if device == "cuda" and not torch.cuda.is_available():
        raise DomgenError("--device cuda was given but PyTorch sees no CUDA GPU; use --device cpu")
    if threads:
        torch.set_num_threads(threads)


def _tracking(tracking_uri: str | None, existing: bool = False) -> str:
    """Configure the MLflow store and, for a server, check within seconds that it answers; ``existing``: the
    command only reads runs, so a local store must already exist."""
    from domgen.tracking import mlflow_store as store

    uri = store.configure(tracking_uri)
    if existing:
        store.check_store_exists(uri)
    store.check_server(uri)
    return uri


def _echo_address(run_id: str, what: str = "run") -> None:
    """One line: the run's id and where it opens in the MLflow UI's training-runs view."""
    from domgen.tracking import mlflow_store as store

    click.echo(f"{what} {run_id}: {store.run_address(run_id)}")


# ---------------------------------------------------------------- data
@main.group(cls=DomgenGroup)
def data():
    """List, check and fetch datasets."""


@data.command("list")
@click.option("--suite", default=None, help="Also list the datasets of this suite ('synthetic' or a suite YAML).")
def data_list(suite):
    """The public datasets domgen knows (see data_cards/) and, with --suite, a suite's datasets."""
    from domgen.data.fetch import PUBLIC_DATASETS
    from domgen.data.registry import load_suite

    s = load_suite(suite) if suite else None  # a wrong --suite is its one sentence, before any listing
    click.echo("Public datasets (cards in data_cards/):")
    for key, info in PUBLIC_DATASETS.items():
        how = "domgen data fetch" if info.urls else "manual download"
        click.echo(f"  {key:26s} {info.title[:70]:70s} [{how}]")
    if s is not None:
        click.echo(f"\nSuite {s.name} ({s.path}):")
        for name, spec in s.datasets.items():
            click.echo(f"  {name:10s} {spec.format:7s} {spec.intensity.describe():32s} {spec.lesion_kind:9s} {spec.root}")


@data.command("check")
@click.argument("name")
@click.option("--suite", default="synthetic", show_default=True, help="'synthetic' or a path to a suite YAML.")
@click.option("--profile", default="quick", show_default=True, help="leave-one-out profile whose keep_slices rule and lung-mask "
              "provider count the kept and dropped slices.")
@click.option("--lung-mask", default=None, help="Lung-mask provider for the count (default: the profile's).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a profile field, e.g. preprocessing.keep_slices=all.")
@click.option("--no-count", is_flag=True, help="Skip the lung masks and the kept/dropped count (faster).")
def data_check(name, suite, profile, lung_mask, overrides, no_count):
    """Read every file of dataset NAME and report patients, slices, sizes, masks, intensities, which steps need a
    window, the lung-mask providers it can use, and the slices the profile's keep_slices rule keeps and drops."""
    from domgen.data.check import check_dataset, format_check
    from domgen.data.registry import load_suite
    from domgen.preprocessing.lung_mask import get_lung_mask_provider, lung_mask_of, usable_providers
    from domgen.preprocessing.slices import SlicePreprocessing, kept_slices

    spec = load_suite(suite).get(name)
    keep, rule = None, None
    if not no_count:
        cfg = _resolve("leave-one-out", profile, overrides, **{"preprocessing.lung_mask": lung_mask})
        pre = SlicePreprocessing.from_config(cfg.preprocessing.as_dict())
        provider = get_lung_mask_provider(pre.lung_mask, **({"weights": pre.lungmask_weights} if pre.lungmask_weights else {}))
        rule = f"{pre.keep_slices} (lung mask: {pre.lung_mask})"

        def keep(case):
            lung = [np.asarray(m, dtype=bool) for m in lung_mask_of(case, provider)]
            return len(kept_slices(case, pre, lung)), case.n_slices

    summary = check_dataset(spec, keep)
    click.echo(format_check(summary, usable_providers(spec.intensity, spec.lungs is not None), rule))


@data.command("fetch")
@click.argument("name")
@click.option("--dest", type=click.Path(file_okay=False, path_type=Path), default=Path("domgen-data/public"), show_default=True)
def data_fetch(name, dest):
    """Download a public dataset where its source allows, and verify its checksum."""
    from domgen.data.fetch import fetch

    click.echo(f"fetched {name} into {fetch(name, dest)}")


@main.command("generate")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Folder (default: $DOMGEN_DATA or ./domgen-data, /synthetic).")
@click.option("--seed", default=0, show_default=True)
@click.option("--scale", default=None, type=float, help="Matrix scale: 512*scale and 630*scale pixels.")
def generate(out, seed, scale):
    """Write the synthetic multi-site CT suite (NIfTI, DICOM, PNG slice folders) to disk."""
    from domgen.data.synthetic import ensure_synthetic_suite

    _check_flags("generate", seed=seed, scale=scale)
    params = {"seed": seed, **({"scale": scale} if scale else {})}
    click.echo(f"suite file: {ensure_synthetic_suite(out, **params)}")


# ---------------------------------------------------------------- leave-one-out
def _selection_options(f):
    """Options of the pseudo-label selection and retraining shared by leave-one-out and pseudolabel."""
    options = [
        click.option("--confidence", default=None, help="Score that ranks the slices: ci (Enshaei et al.) | entropy | tta | mc-dropout."),
        click.option("--filter", "filters", multiple=True, metavar="SCORE=MIN", help="Also require SCORE >= MIN, e.g. tta=0.9 (repeatable)."),
        click.option("--per-patient-max", type=int, default=None, help="At most this many pseudo-labelled slices per patient."),
        click.option("--min-patients", type=int, default=None, help="Select nothing unless the slices come from at least this many patients."),
        click.option("--size-strata", type=int, default=None, help="Spread the selection over this many lesion-size strata."),
        click.option("--select-by", type=click.Choice(["last", "source-val", "pseudo-val"]), default=None,
                     help="Retrained weights: last epoch, best on source validation (paper), best on held-out pseudo-labels."),
        click.option("--seeds", type=int, default=None, help="Repeat the retraining with this many seeds; tables give mean and interval."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _selection_settings(confidence, filters, per_patient_max, min_patients, size_strata, select_by, seeds) -> dict:
    parsed = {}
    for item in filters:
        name, sep, value = item.partition("=")
        try:
            parsed[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise DomgenError(f"--filter {item}: expected SCORE=MIN with a number, e.g. --filter tta=0.9")
    return {"confidence": confidence, "filters": parsed or None, "per_patient_max": per_patient_max, "min_patients": min_patients,
            "size_strata": size_strata, "select_by": select_by, "seeds": seeds}


LEAVE_ONE_OUT_CAPTIONS = {
    "table2": "Table II - {experiment}, run {run} ({uri}): DSC/SPC/SEN before and after CI pseudo-labels, mean ± std over folds",
    "table3": "Table III - in-domain, unseen before and unseen after, mean ± std over rounds (a round: mean over folds and unseen sets)",
    "selection": "Pseudo-label selection per target (mean over folds): slices each label-free rule selects",
    "slices": "Slices kept and dropped per dataset (preprocessing.keep_slices)",
    "table2_extended": "IoU, NSD (3 mm), HD95 (mm), per-slice means, cut-off and slices evaluated, mean ± std over folds",
}


def _common_run_options(f):
    options = [
        click.option("--suite", default=None, help="'synthetic' (default) or a suite YAML describing your copies."),
        click.option("--profile", default="quick", show_default=True, help="quick (CPU demo) | paper | a YAML path."),
        click.option("--seed", type=int, default=None, help="Base seed; fold k uses seed + k."),
        click.option("--device", type=DEVICE, default=None, help="cpu or cuda."),
        click.option("--encoder-weights", default=None, help="none | imagenet | PATH to an encoder state dict."),
        click.option("--lung-mask", default=None, help="Lung-mask provider: threshold | reference | lungmask."),
        click.option("--lungmask-weights", default=None, type=click.Path(), help="Weights file for --lung-mask lungmask."),
        click.option("--tracking-uri", default=None, help="MLflow tracking URI (default sqlite:///mlflow.db)."),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any profile field, e.g. train.epochs=3."),
        click.option("--quiet", is_flag=True, help="No progress bars."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _executor_options(f):
    """Where a family's independent units (folds; transfer's pretraining and fold x strategy runs) run."""
    options = [
        click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
                     help="Where the folds run: this machine, or Ray (a local instance, or a cluster with --address)."),
        click.option("--workers", type=int, default=1, show_default=True,
                     help="Folds in parallel (local: worker processes; ray: trials on the local Ray instance)."),
        click.option("--address", default=None, help="Ray cluster address (auto or ray://head:10001); needs an http --tracking-uri."),
        click.option("--gpus-per-trial", type=float, default=None,
                     help="Ray with --device cuda: the GPU share of one fold, a fraction in (0, 1] or a whole number [default: 1]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _runner(executor: str, workers: int, address: str | None, gpus_per_trial: float | None, cfg):
    """The executor of the units (flags checked before any run exists); None for the default: this process."""
    from domgen.executors import get_executor
    from domgen.settings import environment

    # torch threads per unit: the 2D families' threads row or DOMGEN_THREADS, else the cores shared out between the workers
    runner = get_executor(executor, workers=workers, address=address, device=cfg.device,
                          threads=getattr(cfg, "threads", None) or environment("DOMGEN_THREADS"), gpus_per_trial=gpus_per_trial)
    return None if executor == "local" and workers == 1 else runner


def _resolve(family: str, profile: str, overrides, check=None, **flat):
    """Profile + ``--set`` + flags of ``FAMILIES[family]``, every value checked against ``domgen.settings`` (before
    any file or run): the family's typed config. ``check(cfg)``: the command's own check of settings together, also
    before any file (the datasets) is touched."""
    from domgen.families import FAMILIES
    from domgen.settings import environment

    environment("DOMGEN_THREADS")
    environment("DOMGEN_HEARTBEAT_SECONDS")
    cfg = FAMILIES[family].config(profile, overrides, **flat)
    if check is not None:
        check(cfg)
    # imported after the checks above, so a mistyped flag is refused before torch and MLflow load
    from domgen.families.common import check_datasets

    check_datasets(cfg)
    return cfg


def _without_set(exc: DomgenError) -> DomgenError:
    """The table's sentence for a command that has no --set: it names the flag alone."""
    return DomgenError(re.sub(r" or --set \S+=\.\.\.", "", str(exc)))


def _check_flags(family: str, **values) -> dict:
    """Flags that do not go through a profile, checked against the same table; the given ones, coerced."""
    from domgen.settings import TABLE, check_value

    checked = {}
    for key, value in values.items():
        if value is not None:
            try:
                checked[key] = check_value(TABLE[(family, key)], value)
            except DomgenError as exc:
                raise _without_set(exc) from None
    return checked


def _check_pseudolabel_flags(flags: dict) -> None:
    """The pseudo-label flags (keys of the profile's pseudolabel section) checked like a profile's, filters included."""
    from domgen.settings import LOO, validate

    try:
        validate({"family": LOO, "pseudolabel": {k: v for k, v in flags.items() if v is not None}}, fill=False)
    except DomgenError as exc:
        raise _without_set(exc) from None


@main.command("leave-one-out")
@click.option("--source", required=True, help="Source dataset(s): A, a comma list A,B,C (one round each, Table III over "
              "rounds, as the paper), or all (every COVID dataset of the suite).")
@click.option("--targets", default=None, help="Comma-separated unseen datasets (default: every other COVID dataset).")
@click.option("--folds", type=int, default=None, help="Number of folds k: each source patient is tested once, in 1/k (quick: 2, paper: 3).")
@click.option("--ci-min", type=float, default=None, help="Keep pseudo-labels with Certainty Index >= this (--ci-rule fixed).")
@click.option("--ci-rule", type=click.Choice(["fixed", "indomain-quantile"]), default=None,
              help="CI limit: --ci-min, or the --ci-quantile of the in-domain test slices' CI (no target labels needed).")
@click.option("--ci-quantile", type=float, default=None, help="Quantile for --ci-rule indomain-quantile (0.5: the median).")
@click.option("--min-pixels", type=int, default=None, help="Drop slices with fewer pixels above the cut-off (at --min-pixels-at).")
@click.option("--min-pixels-at", type=int, default=None, help="Matrix size at which --min-pixels is defined (paper: 50 at 512); "
              "scaled by area for other slice sizes.")
@click.option("--keep-slices", type=click.Choice(["all", "lung", "lesion"]), default=None,
              help="Which slices become samples: every slice, slices with lung, slices with lesion.")
@click.option("--top-k", type=int, default=None, help="At most this many pseudo-labelled slices per target.")
@click.option("--top-fraction", type=float, default=None, help="At most this fraction of the ranked slices.")
@click.option("--mix", type=click.Choice(["source+pseudo", "pseudo-only"]), default=None)
@click.option("--rounds", type=int, default=None, help="Select-and-retrain rounds.")
@click.option("--init-checkpoint", type=click.Path(), default=None, help="Start from this domgen checkpoint instead of a fresh model.")
@click.option("--init-run", default=None, help="Start from the model of this MLflow run (a pretrain or transfer run's model/checkpoint.pt).")
@click.option("--arch", default=None, help="smp architecture: linknet | unet | fpn | pspnet (profile default: linknet).")
@click.option("--encoder", default=None, help="smp encoder name, e.g. resnet34 (profile default).")
@_selection_options
@_common_run_options
@_executor_options
def leave_one_out(source, targets, folds, ci_min, ci_rule, ci_quantile, min_pixels, min_pixels_at, keep_slices, top_k, top_fraction,
                  mix, rounds, init_checkpoint, init_run, arch, encoder, confidence, filters, per_patient_max, min_patients, size_strata, select_by, seeds,
                  suite, profile, seed, device, encoder_weights, lung_mask, lungmask_weights, tracking_uri, overrides, quiet,
                  executor, workers, address, gpus_per_trial):
    """Train on SOURCE, test in-domain and on unseen datasets, retrain on Certainty-Index pseudo-labels.

    Prints the paper's Table II (per round and test set, DSC/SPC/SEN before and after) and Table III
    (in-domain, unseen before and after, mean ± std over rounds), the slices each selection rule picks,
    and the slices kept and dropped per dataset. Re-running the same command resumes: finished runs are
    found by their config hash.
    """
    cfg = _resolve("leave-one-out", profile, overrides, **{
        "source": source, "targets": targets, "folds": folds, "suite": suite, "seed": seed, "device": device,
        "model.arch": arch, "model.encoder": encoder,
        "model.encoder_weights": encoder_weights, "preprocessing.lung_mask": lung_mask,
        "preprocessing.lungmask_weights": lungmask_weights, "pseudolabel.ci_min": ci_min,
        "pseudolabel.min_pixels": min_pixels, "pseudolabel.top_k": top_k, "pseudolabel.top_fraction": top_fraction,
        "pseudolabel.mix": mix, "pseudolabel.rounds": rounds, "init_checkpoint": init_checkpoint,
        "pseudolabel.ci_rule": ci_rule, "pseudolabel.ci_quantile": ci_quantile, "pseudolabel.min_pixels_at": min_pixels_at,
        "preprocessing.keep_slices": keep_slices,
        **{f"pseudolabel.{k}": v for k, v in _selection_settings(confidence, filters, per_patient_max, min_patients, size_strata,
                                                                 select_by, seeds).items()}})
    from domgen.families import FAMILIES
    from domgen.tracking import mlflow_store as store
    from domgen.reports.report import leave_one_out_tables, to_markdown

    family = FAMILIES["leave-one-out"]
    if init_run:
        if cfg.init_checkpoint:
            raise DomgenError("give at most one of --init-run and --init-checkpoint")
        # only the run id enters the config (and its hash); the checkpoint is downloaded when training starts
        cfg = cfg.replace(init_run=init_run)
    runner = _runner(executor, workers, address, gpus_per_trial, cfg)
    _threads(cfg.device)
    uri = _tracking(tracking_uri)
    parent = family.run_config(cfg, progress=not quiet, runner=runner)
    tables = leave_one_out_tables(parent)
    for name, caption in LEAVE_ONE_OUT_CAPTIONS.items():
        click.echo(f"\n{caption.format(experiment=family.experiment, run=parent, uri=uri)}\n")
        click.echo(to_markdown(tables[name]))
    differs = store.get_run(parent).data.tags.get("domgen.init_input_differs")
    if differs:
        click.echo(f"\nNote: the start model was trained on other input than this round's ({differs}).")
    click.echo(f"\nAll tables: `domgen report --experiment {family.experiment} --run-id {parent}`; browse: `domgen ui`")
    _echo_address(parent)


@main.command("compare")
@click.option("--sources", required=True, help="Source dataset(s): A, or A,B pooled (leave-one-domain-out).")
@click.option("--targets", default=None, help="Comma-separated unseen datasets (default: every other COVID dataset).")
@click.option("--methods", default=None, help="Comma-separated methods: erm, erm-multi, bigaug, gin, adabn, tent, ci-pseudolabel, "
              "transfer; TEST@TRAIN adapts TRAIN's model (tent@bigaug), TRAIN+transfer starts from --init-run.")
@click.option("--seeds", type=int, default=None, help="Seeds (seed + 1000 s), each with its own patient-wise folds.")
@click.option("--folds", type=int, default=None, help="Folds k of each seed's patient-wise k-fold.")
@click.option("--selection", default=None, help="Model selection: training-domain (default) | last | oracle (the targets' labels "
              "choose the epoch; labelled oracle everywhere).")
@click.option("--init-run", default=None, help="The pretrained model (a `domgen transfer` run) of transfer and NAME+transfer.")
@_executor_options
@_common_run_options
def compare(sources, targets, methods, seeds, folds, selection, init_run, executor, workers, address, gpus_per_trial, suite, profile,
            seed, device, encoder_weights, lung_mask, lungmask_weights, tracking_uri, overrides, quiet):
    """Compare domain-generalisation methods on the same folds and seeds (DomainBed-style, issue 20).

    Prints, per target and method, DSC/NSD/SEN as mean [95 % t interval] over seeds x folds and the paired
    patient-level bootstrap difference against erm with Wilcoxon p, then the average rank over targets.
    Test-time methods adapt the erm models (found by hash); re-running the same command resumes.
    """
    cfg = _resolve("compare", profile, overrides, **{
        "sources": sources, "targets": targets, "methods": methods, "seeds": seeds, "folds": folds, "selection": selection,
        "init_run": init_run, "suite": suite, "seed": seed, "device": device, "model.encoder_weights": encoder_weights,
        "preprocessing.lung_mask": lung_mask, "preprocessing.lungmask_weights": lungmask_weights})
    from domgen.families import FAMILIES
    from domgen.families.compare import EXPERIMENT, compare_tables, selection_label
    from domgen.tracking.tables import to_markdown

    runner = _runner(executor, workers, address, gpus_per_trial, cfg)
    _threads(cfg.device)
    uri = _tracking(tracking_uri)
    parent = FAMILIES["compare"].run_config(cfg, progress=not quiet, runner=runner)
    tables = compare_tables(parent)
    click.echo(f"\nMethods per target (mean [95 % t interval] over seeds x folds; model selection: "
               f"{selection_label(cfg.selection)}; experiment {EXPERIMENT}, run {parent}, {uri})\n")
    click.echo(to_markdown(tables["results"]))
    click.echo("\nAverage rank over targets (by mean DSC, 1 best)\n")
    click.echo(to_markdown(tables["ranks"]))
    click.echo(f"\nAll tables and the plot: `domgen report --experiment {EXPERIMENT} --run-id {parent}`")
    _echo_address(parent)


@main.command("pseudolabel")
@click.option("--target", required=True, help="Unseen dataset to pseudo-label (a suite dataset name).")
@click.option("--run-id", default=None, help="A finished leave-one-out fold run (its model/checkpoint.pt is used).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Or a checkpoint file written by domgen.")
@click.option("--ci-min", type=float, default=None, help="Keep slices with Certainty Index >= this under --ci-rule fixed (default: the run's; 0.8 is domgen's choice, the paper gives no number).")
@click.option("--ci-rule", type=click.Choice(["fixed", "indomain-quantile"]), default=None,
              help="CI limit: --ci-min, or the --ci-quantile of the fold's in-domain test CI.")
@click.option("--ci-quantile", type=float, default=None)
@click.option("--min-pixels", type=int, default=None, help="Drop slices with fewer pixels above the cut-off (at --min-pixels-at).")
@click.option("--min-pixels-at", type=int, default=None, help="Matrix size at which --min-pixels is defined.")
@click.option("--top-k", type=int, default=None)
@click.option("--top-fraction", type=float, default=None)
@click.option("--mix", type=click.Choice(["source+pseudo", "pseudo-only"]), default=None)
@click.option("--rounds", type=int, default=None)
@click.option("--suite", default=None, help="Suite to read the data from (default: the run's).")
@click.option("--device", type=DEVICE, default=None)
@click.option("--tracking-uri", default=None)
@click.option("--quiet", is_flag=True)
@click.option("--export-for-review", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Write the selected slices with their predicted masks (NIfTI, PNG overlays, manifest.csv) to this new folder and stop.")
@click.option("--reviewed", "reviewed_dir", type=click.Path(path_type=Path), default=None,
              help="Retrain on the corrected masks of a review folder (a row deleted from manifest.csv rejects that slice).")
@_selection_options
def pseudolabel(target, run_id, checkpoint, ci_min, ci_rule, ci_quantile, min_pixels, min_pixels_at, top_k, top_fraction, mix, rounds,
                suite, device, tracking_uri, quiet, export_dir, reviewed_dir, confidence, filters, per_patient_max, min_patients,
                size_strata, select_by, seeds):
    """Rank TARGET's slices by a confidence score (the Certainty Index by default), retrain on the most confident,
    evaluate before and after; or export the selection for a radiologist's review and retrain on the corrections."""
    if (run_id is None) == (checkpoint is None):
        raise DomgenError("give exactly one of --run-id and --checkpoint")
    if export_dir is not None and reviewed_dir is not None:
        raise DomgenError("give at most one of --export-for-review (write a review folder) and --reviewed (retrain on one)")
    flags = {"ci_min": ci_min, "min_pixels": min_pixels, "top_k": top_k, "top_fraction": top_fraction, "mix": mix, "rounds": rounds,
             "ci_rule": ci_rule, "ci_quantile": ci_quantile, "min_pixels_at": min_pixels_at,
             **_selection_settings(confidence, filters, per_patient_max, min_patients, size_strata, select_by, seeds)}
    _check_pseudolabel_flags(flags)  # before the store is opened or the checkpoint read
    from domgen.families.leave_one_out import checkpoint_of_run, run_pseudolabel
    from domgen.tracking import mlflow_store as store

    _tracking(tracking_uri, existing=run_id is not None)
    _threads(device or "cpu")
    with store.artifact_dir() as tmp:
        path = checkpoint if checkpoint else checkpoint_of_run(run_id, tmp)
        result = run_pseudolabel(path, target, flags, suite=suite, device=device, progress=not quiet, export_dir=export_dir, reviewed_dir=reviewed_dir)
    if export_dir is not None:
        click.echo(f"wrote {result['exported']} slices to {export_dir}: edit masks/*.nii.gz (ITK-SNAP, 3D Slicer), delete a row of "
                   f"manifest.csv to reject a slice, then run the same command with --reviewed {export_dir}")
        return
    click.echo(f"{'':10s}{'DSC':>8s}{'SEN':>8s}{'SPC':>8s}  run")
    for phase, m in result.items():
        click.echo(f"{phase:10s}{m.get('dsc', float('nan')):8.3f}{m.get('sen', float('nan')):8.3f}{m.get('spc', float('nan')):8.3f}  {m['run_id']}")
    click.echo(f"pseudo-labelled slices: {int(result['enhanced'].get('n_pseudo_labels', 0))}")
    _echo_address(result["enhanced"]["run_id"], "enhanced run")
    if reviewed_dir is not None:
        m = result["enhanced"]
        click.echo(f"review: {int(m.get('review_kept', 0))} kept, {int(m.get('review_corrected', 0))} corrected "
                   f"(Dice prediction vs correction {m.get('review_correction_dice', float('nan')):.3f}), {int(m.get('review_rejected', 0))} rejected")


@main.command("confidence")
@click.option("--target", required=True, help="Unseen dataset with ground truth (a suite dataset name).")
@click.option("--run-id", default=None, help="A finished leave-one-out fold run (its model/checkpoint.pt is scored).")
@click.option("--checkpoint", type=click.Path(path_type=Path), default=None, help="Or a checkpoint file written by domgen.")
@click.option("--top-k", type=int, default=50, show_default=True, help="K of the mean true DSC of the top-K slices per score.")
@click.option("--suite", default=None, help="Suite to read the data from (default: the run's).")
@click.option("--device", type=DEVICE, default=None)
@click.option("--tracking-uri", default=None)
@click.option("--quiet", is_flag=True)
def confidence(target, run_id, checkpoint, top_k, suite, device, tracking_uri, quiet):
    """Score every slice of TARGET with every confidence score (CI, entropy, TTA agreement, MC dropout, the CI of the
    temperature-scaled model, boundary and interior entropy) without retraining. Prints per score the Spearman
    correlation with the true slice DSC [95 % CI], AURC and E-AURC (risk = 1 - slice DSC) [95 % CI] and the mean true
    DSC of the top-K slices; what the profile's selection rule keeps by the CI and by the scaled CI; and the lesion-pixel
    calibration (ECE, ACE, MCE) of the in-domain test set and of TARGET before and after temperature scaling (fitted on
    the fold's source validation slices). Logged to MLflow (experiment domgen-confidence) with the DSC-vs-score,
    risk-coverage and reliability plots."""
    from domgen.families import FAMILIES
    from domgen.families.confidence import EXPERIMENT, confidence_tables
    from domgen.families.leave_one_out import checkpoint_of_run
    from domgen.tracking import mlflow_store as store
    from domgen.reports.report import to_markdown

    if (run_id is None) == (checkpoint is None):
        raise DomgenError("give exactly one of --run-id and --checkpoint")
    _check_flags("confidence", top_k=top_k)
    uri = store.configure(tracking_uri)
    _threads(device or "cpu")
    with store.artifact_dir() as tmp:
        path = checkpoint if checkpoint else checkpoint_of_run(run_id, tmp)
        run, _ = FAMILIES["confidence"].run_function()(path, target, top_k, suite=suite, device=device, progress=not quiet)
    tables = confidence_tables(run)
    click.echo(f"\nConfidence scores on {target}: Spearman with the true slice DSC [95 % CI], AURC / E-AURC (risk 1 - slice DSC) "
               f"[95 % CI] and mean true DSC of the top {top_k} ({EXPERIMENT}, run {run}, {uri})\n\n{to_markdown(tables['confidence'])}")
    if "selection" in tables:
        click.echo(f"\nThe profile's selection rule, ranking and limiting by the CI and by the temperature-scaled CI:\n\n"
                   f"{to_markdown(tables['selection'])}")
    if "calibration" in tables:
        from domgen.evaluation.calibration import NUM_BINS

        click.echo(f"\nLesion-pixel calibration ({NUM_BINS} equal bins; ECE weighted by pixels, ACE unweighted, MCE the worst bin; "
                   f"temperature fitted on source validation slices):\n\n{to_markdown(tables['calibration'])}")
    _echo_address(run)


# ---------------------------------------------------------------- transfer
TRANSFER_CAPTIONS = {"table1": "Table I - DSC and NSD (3 mm, per case in 3D), mean ± std over the test cases of each fold and of "
                               "all folds; NSD per slice: the older 2D per-slice NSD",
                     "table2": "Table II - sensitivity, F1 and accuracy per case, mean ± std over the test cases of all folds",
                     "table3": "Table III - multi-lesion model: strategies, parameters and seconds per epoch",
                     "note": "Note"}


@main.command("transfer")
@click.option("--target", default=None, help="COVID target dataset in the suite (profile default: A).")
@click.option("--pretrain", default=None, help="Comma-separated pretrained models: msd,structseg,nsclc,multi.")
@click.option("--strategy", default=None, help="Comma-separated strategies: scratch,continual,body,frozen,multi-encoder.")
@click.option("--folds", type=int, default=None, help="Inverse k-fold by patient: train on 1/k, test on the rest (5: 20 %/80 %).")
@click.option("--arch", default=None, help="smp architecture: linknet | unet | fpn | pspnet.")
@click.option("--encoder", default=None, help="smp encoder name, e.g. resnet34.")
@click.option("--splits-file", type=click.Path(), default=None,
              help="A splits.json giving the folds (each fold's train part, test the rest) instead of drawing --folds.")
@click.option("--dims", type=int, default=None, help="2 (default): slices and smp models; 3: whole volumes and the 3D U-Net "
              "(the profile's volume section).")
@_common_run_options
@_executor_options
def transfer(target, pretrain, strategy, folds, arch, encoder, splits_file, dims, suite, profile, seed, device, encoder_weights, lung_mask,
             lungmask_weights, tracking_uri, overrides, quiet, executor, workers, address, gpus_per_trial):
    """Pretrain on non-COVID lung lesions, then train the COVID target with each transfer strategy (Wang et al.).

    Prints Table I (DSC, NSD per fold), Table II (SEN, F1, ACC) and Table III (the multi-lesion model's
    strategies with parameters and seconds per epoch). Re-running the same command resumes.
    """
    cfg = _resolve("transfer", profile, overrides, **{
        "target": target, "pretrain": pretrain, "strategies": strategy, "folds": folds, "suite": suite, "seed": seed,
        "device": device, "model.arch": arch, "model.encoder": encoder, "model.encoder_weights": encoder_weights,
        "preprocessing.lung_mask": lung_mask, "preprocessing.lungmask_weights": lungmask_weights, "splits_file": splits_file, "dims": dims})
    if cfg.dims == 3:
        flags = {"--arch": arch, "--encoder": encoder, "--encoder-weights": encoder_weights, "--lung-mask": lung_mask,
                 "--lungmask-weights": lungmask_weights}
        given = [flag for flag, value in flags.items() if value is not None]
        if given:
            raise DomgenError(f"{', '.join(given)} set the 2D model and slices; with --dims 3 the 3D U-Net and its volumes come "
                              "from the profile's volume section (--set volume.model.features=..., volume.preprocessing.*)")
    from domgen.families import FAMILIES
    from domgen.families.transfer import EXPERIMENT, check_inputs
    from domgen.reports.report import to_markdown
    from domgen.reports.transfer_report import transfer_tables

    check_inputs(cfg)
    runner = _runner(executor, workers, address, gpus_per_trial, cfg)
    _threads(cfg.device)
    uri = _tracking(tracking_uri)
    parent = FAMILIES["transfer"].run_config(cfg, progress=not quiet, runner=runner)
    click.echo(f"\n{EXPERIMENT}, parent run {parent} ({uri})")
    for name, df in transfer_tables(parent).items():
        click.echo(f"\n{TRANSFER_CAPTIONS[name]}\n\n{to_markdown(df)}")
    _echo_address(parent)


# ---------------------------------------------------------------- reports and UI
@main.command("report")
@click.option("--experiment", default="domgen-leave-one-out", show_default=True,
              help="MLflow experiment: domgen-leave-one-out | domgen-transfer | domgen-benchmark.")
@click.option("--run-id", default=None, help="Parent run: a round or a sweep (default: the newest finished one).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("reports"), show_default=True)
@click.option("--tracking-uri", default=None)
@click.option("--compare", is_flag=True, help="Unseen DSC/SEN/SPC: baseline, + CI pseudo-labels, Multi-encoder transfer, + both "
              "(leave-one-out rounds without and with --init-run; --run-id picks the latter).")
@click.option("--against-paper", is_flag=True, help="Benchmark only: each finished configuration's Sens/Spec/Dice (%) beside "
              "Bizopoulos et al.'s published Table II and the difference (pp).")
@click.option("--paper-table", type=click.Path(path_type=Path), default=None,
              help="With --against-paper: CSV of the published Table II (columns experiment, architecture, encoder, sensitivity, "
              "specificity, dice, source; optional weights; values in %). domgen ships none.")
def report(experiment, run_id, out, tracking_uri, compare, against_paper, paper_table):
    """Rebuild the paper's tables from MLflow alone; writes Markdown, CSV and LaTeX (benchmark: also figures)."""
    from domgen.families import family_of_experiment
    from domgen.reports.report import to_markdown, write_tables

    _check_flags("report", experiment=experiment)
    if paper_table is not None and not against_paper:
        raise DomgenError("--paper-table is read only with --against-paper; add --against-paper")
    if against_paper:
        from domgen.reports.benchmark_report import EXPERIMENT, against_paper_report, load_paper_table

        if compare:
            raise DomgenError("give at most one of --compare and --against-paper")
        if experiment != EXPERIMENT:
            raise DomgenError(f"--against-paper compares the benchmark with Bizopoulos et al.'s Table II; use it with "
                              f"--experiment {EXPERIMENT}, not {experiment}")
        _check_flags("report", paper_table=None if paper_table is None else str(paper_table))
        paper = load_paper_table(paper_table)  # a bad table fails before the store is opened
        _tracking(tracking_uri, existing=True)
        built = against_paper_report(out, run_id, paper)
        click.echo(f"\nSweep {built['parent_id']} against the published Table II (ours minus paper; Sens/Spec/Dice in %, "
                   f"differences in percentage points)\n\n{to_markdown(built['shown'])}\n\n{built['summary']}\n"
                   f"wrote {len(built['files'])} files to {built['folder']}")
        _echo_address(built["parent_id"], "sweep")
        return
    family = None if compare else family_of_experiment(experiment)
    _tracking(tracking_uri, existing=True)
    if compare:
        from domgen.reports.transfer_report import comparison_table

        table = comparison_table(run_id)
        paths = write_tables({"comparison": table}, out / "comparison")
        click.echo(f"\nUnseen targets: (a) baseline, (b) + CI pseudo-labels, (c) Multi-encoder transfer, (d) (c) + CI pseudo-labels\n\n"
                   f"{to_markdown(table)}\n\nwrote {len(paths)} files to {out / 'comparison'}")
        return
    built = family.build_report(out, run_id)
    for name, df in built["tables"].items():
        click.echo(f"\n{name}\n\n{to_markdown(df)}")
    click.echo(f"\nwrote {len(built['files'])} files to {built['folder']}")
    _echo_address(built["parent_id"])


@main.command("ui")
@click.option("--tracking-uri", default=None)
@click.option("--port", default=5000, show_default=True)
def ui(tracking_uri, port):
    """Start the MLflow UI on 127.0.0.1 for the domgen store (Ctrl-C or SIGTERM stops it and everything it started)."""
    import contextlib
    import os
    import signal
    import subprocess

    from domgen.families import FAMILIES
    from domgen.tracking import mlflow_store as store

    _check_flags("ui", port=port)
    uri = _tracking(tracking_uri)
    base = f"http://127.0.0.1:{port}"
    click.echo(f"MLflow UI for {uri} at {store.ui_url(base)}")
    if not uri.startswith("sqlite:///") or Path(uri[len("sqlite:///"):]).is_file():
        for family in FAMILIES.values():
            exp = store.get_experiment(family.experiment)
            if exp is not None:
                click.echo(f"  {family.experiment:22s} {store.ui_url(base, exp.experiment_id)}")
    from domgen.executors.ray_executor import NO_JOB_RUNNER

    # its own process group, without MLflow's GenAI job runner (huey workers domgen never uses): Ctrl-C or SIGTERM to
    # domgen ends the whole group, so no worker outlives the UI
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port)],
                              start_new_session=True, env={**os.environ, **NO_JOB_RUNNER})

    def stop(*_):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupted)  # SIGTERM (a scheduler, `timeout`) stops it like Ctrl-C
    try:
        server.wait()
    except KeyboardInterrupt:
        click.echo("stopping the MLflow UI")
    finally:
        stop()
        signal.signal(signal.SIGTERM, previous)


# ---------------------------------------------------------------- benchmark (Bizopoulos et al.)
def _check_stack(cfg) -> None:
    """--stack K > 1 needs training settings the stacked step can honour (torch loads only then)."""
    if cfg.stack > 1:
        from domgen.families.benchmark import check_stack

        check_stack(cfg)


@main.command("benchmark")
@click.option("--experiments", default=None, help="Comma-separated: lung, lesion-a, lesion-b (default: the profile's grid, all three).")
@click.option("--archs", default=None, help="Comma-separated: unet, linknet, fpn, pspnet.")
@click.option("--encoders", default=None, help="Comma-separated smp encoders (default: the paper's 25).")
@click.option("--weights", default=None, help="Comma-separated: random, imagenet.")
@click.option("--profile", default="quick", show_default=True, help="quick (CPU size) | paper (GPU, --suite with medseg100/medseg9) | a YAML path.")
@click.option("--suite", default=None, help="'synthetic' or a suite YAML (the paper profile needs one, see experiments/benchmark/paper.yaml).")
@click.option("--device", type=DEVICE, default=None, help="cpu or cuda (ray: one GPU per trial unless --gpus-per-trial).")
@click.option("--seed", type=int, default=None, help="Seed of every configuration's split and training (profile default: 0).")
@click.option("--lung-mask", default=None, help="Lung-mask provider: threshold | otsu | reference | lungmask (profile default).")
@click.option("--lungmask-weights", default=None, type=click.Path(), help="Weights file for --lung-mask lungmask.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True)
@click.option("--workers", type=int, default=1, show_default=True, help="Trials in parallel (local: worker processes; ray: local Ray CPUs/GPUs).")
@click.option("--gpus-per-trial", type=float, default=None,
              help="Ray with --device cuda: the GPU share of one trial, a fraction in (0, 1] (0.25: four trials per GPU) or a whole "
                   "number [default: 1 with cuda, 0 on CPU].")
@click.option("--stack", type=int, default=None,
              help="Train up to K configurations of one architecture x encoder together, stepped as one stacked model in one "
                   "process (needs --set train.device_data=true) [default: the profile's, 1].")
@click.option("--address", default=None, help="Ray cluster address (e.g. auto or ray://head:10001); needs an http --tracking-uri.")
@click.option("--retry-failed", is_flag=True, help="Run the configurations recorded as failed again.")
@click.option("--dry-run", is_flag=True, help="List the configurations and which are already done; train nothing.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (ray: an `mlflow server` URL; none: one is started on 127.0.0.1).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override any profile field, e.g. train.epochs=1.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def benchmark(experiments, archs, encoders, weights, profile, suite, device, seed, lung_mask, lungmask_weights, executor, workers, gpus_per_trial, stack, address,
              retry_failed, dry_run, tracking_uri, overrides, quiet):
    """Bizopoulos et al.'s grid: experiment x architecture x encoder x weights, one MLflow run each.

    Re-running the same command resumes (finished configurations are found by their config hash);
    failed ones are recorded with their reason and skipped until --retry-failed. Tables and figures:
    `domgen report --experiment domgen-benchmark`.
    """
    import yaml

    # the grid flags enter as settings, so the image size is checked against the architectures actually run
    grid = {"grid.experiments": experiments, "grid.archs": archs, "grid.encoders": encoders, "grid.weights": weights,
            "seed": seed, "preprocessing.lung_mask": lung_mask, "preprocessing.lungmask_weights": lungmask_weights, "stack": stack}
    cfg = _resolve("benchmark", profile, overrides, check=_check_stack, suite=suite, device=device, **grid)  # every --set checked

    from domgen.executors import get_executor
    from domgen.families import FAMILIES
    from domgen.families.benchmark import EXPERIMENT, RETRY_KEYS, dry_run as list_configurations, resolve, retry_overrides

    cfg = resolve(cfg)
    retry_with = {}
    if retry_failed:
        # resource settings of a retry apply to the failed configurations of this same sweep, not a new sweep
        keep = [item for item in overrides if item.split("=", 1)[0].strip() not in RETRY_KEYS]
        retry_with = retry_overrides(cfg, {item.split("=", 1)[0].strip(): yaml.safe_load(item.split("=", 1)[1])
                                           for item in overrides if item not in keep})
        cfg = resolve(_resolve("benchmark", profile, keep, suite=suite, device=device, **grid))
    _check_stack(cfg.replace(**retry_with) if retry_with else cfg)
    get_executor(executor, workers=workers, address=address, device=cfg.device, threads=cfg.threads,
                 gpus_per_trial=gpus_per_trial)  # checks the flags
    uri = _tracking(tracking_uri)
    if dry_run:
        rows = list_configurations(cfg)
        for configuration, h, state in rows:
            click.echo(f"{h}  {state:7s}  {configuration.name}")
        counts = {s: sum(r[2] == s for r in rows) for s in ("done", "running", "failed", "todo")}
        click.echo(f"\n{len(rows)} configurations: {counts['done']} done, {counts['running']} running elsewhere, {counts['failed']} failed, "
                   f"{counts['todo']} to run ({EXPERIMENT} at {uri})")
        return
    _threads(cfg.device)
    result = FAMILIES["benchmark"].run_config(cfg, progress=not quiet, executor=executor, workers=workers, address=address,
                                              retry_failed=retry_failed, retry_with=retry_with, gpus_per_trial=gpus_per_trial)
    for name, reason in result.failed.items():
        click.echo(f"failed: {name}: {reason}", err=True)
    click.echo(f"sweep {result.parent_id}: {result.finished} finished now, {result.skipped} already done, {len(result.failed)} failed, "
               f"{result.elsewhere} running in another driver ({result.seconds:.0f} s). Report: domgen report --experiment {EXPERIMENT}" + (f" --tracking-uri {tracking_uri}" if tracking_uri else ""))
    _echo_address(result.parent_id, "sweep")


@main.command("export")
@click.argument("run_id", required=False)
@click.option("--sweep", "sweep_id", default=None, metavar="SWEEP_RUN_ID",
              help="Export every finished configuration of this benchmark sweep into --out DIR, with manifest.csv/.json.")
@click.option("--format", "fmt", default="state-dict", show_default=True, help="state-dict | torchscript | onnx.")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Output file (default exports/<run>-<arch>-<encoder>.<ext>); with --sweep the zoo folder (required).")
@click.option("--tracking-uri", default=None)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def export(run_id, sweep_id, fmt, out, tracking_uri, quiet):
    """Export RUN_ID's trained model (a benchmark configuration), or with --sweep every model of a sweep with a
    manifest; load one with domgen.models.export.load_exported or load_from_manifest."""
    _check_flags("export", format=fmt)
    if (run_id is None) == (sweep_id is None):
        raise DomgenError("give either RUN_ID (one model) or --sweep SWEEP_RUN_ID (every model of a benchmark sweep), not both or neither")
    if sweep_id is not None and out is None:
        raise DomgenError("--sweep needs --out DIR, the folder the models and their manifest are written to")
    _tracking(tracking_uri, existing=True)
    if sweep_id is None:
        from domgen.families.common import export_run

        click.echo(f"wrote {export_run(run_id, fmt, out)}")
        return
    from domgen.families.zoo import export_sweep

    result = export_sweep(sweep_id, out, fmt, progress=not quiet)
    for name, reason in result.skipped.items():
        click.echo(f"skipped: {name}: {reason}", err=True)
    click.echo(f"exported {result.exported} configurations of sweep {sweep_id} to {out} ({result.already} already there, "
               f"{len(result.skipped)} skipped); manifest {result.manifest}")


# ---------------------------------------------------------------- cross-validate (Müller et al., 3D)
@main.command("cross-validate")
@click.option("--source", default=None, help="Dataset for k-fold cross-validation (volumes: nifti or dicom; profile default A).")
@click.option("--external", default=None, help="External test dataset (profile default B; 'none' for no external set).")
@click.option("--folds", type=int, default=None, help="k of the k-fold cross-validation (quick: 3, paper: 5).")
@click.option("--sampler", type=click.Choice(["uniform", "foreground"]), default=None, help="Patch sampler (paper: uniform).")
@click.option("--ablation", is_flag=True, help="Run the profile's ablation grid: k x preprocessing on/off x augmentation on/off (a superset of the paper's).")
@_common_run_options
@_executor_options
def cross_validate(source, external, folds, sampler, ablation, suite, profile, seed, device, encoder_weights, lung_mask,
                   lungmask_weights, tracking_uri, overrides, quiet, executor, workers, address, gpus_per_trial):
    """Müller et al.'s limited-data 3D U-Net: k-fold on SOURCE, each fold model (and domgen's ensemble) on EXTERNAL.

    Prints median ± SD over volumes of DSC, IoU, SEN, SPC, ACC, precision, NSD and HD95 for lungs and lesion
    (validation folds pooled; external set per fold model, pooled over the fold models as the paper reports, and for
    the ensemble, domgen's addition). Re-running resumes.
    """
    if encoder_weights is not None:
        raise DomgenError("--encoder-weights applies to the 2D smp encoders; the 3D U-Net of cross-validate starts from random weights")
    if external is not None:  # through the overrides, so the external dataset is checked with the others
        overrides = (*overrides, f"external={'null' if external.lower() == 'none' else external}")
    cfg = _resolve("cross-validate", profile, overrides, **{
        "source": source, "folds": folds, "suite": suite, "seed": seed, "device": device, "train.sampler": sampler,
        "preprocessing.lung_mask": lung_mask})
    if lungmask_weights is not None:
        raise DomgenError("--lungmask-weights is not used by cross-validate; lung masks come from --lung-mask (reference or threshold)")
    from domgen.families import FAMILIES
    from domgen.families.cross_validate import EXPERIMENT, run_ablation
    from domgen.tracking import mlflow_store as store
    from domgen.reports.cross_validate_report import ablation_table, cross_validate_tables
    from domgen.reports.report import to_markdown

    runner = _runner(executor, workers, address, gpus_per_trial, cfg)
    _threads(cfg.device)
    uri = store.configure(tracking_uri)
    if ablation:
        parents = run_ablation(cfg, progress=not quiet, runner=runner)
        click.echo(f"\nSensitivity analysis - {EXPERIMENT} ({uri}), median ± SD over volumes\n\n{to_markdown(ablation_table(parents))}")
        return
    parent = FAMILIES["cross-validate"].run_config(cfg, progress=not quiet, runner=runner)
    click.echo(f"\n{EXPERIMENT}, parent run {parent} ({uri}); median ± SD over volumes")
    for name, df in cross_validate_tables(parent).items():
        click.echo(f"\n{name}\n\n{to_markdown(df)}")
    click.echo(f"\nTables again: `domgen report --experiment {EXPERIMENT} --run-id {parent}`")
    _echo_address(parent)


if __name__ == "__main__":
    main()
