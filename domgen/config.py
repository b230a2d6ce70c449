"""Experiment configs: YAML profiles in ``experiments/<family>/<profile>.yaml`` plus CLI overrides.

A run is identified by the hash of its resolved config (``domgen.tracking.identity``), which is also its MLflow
tag ``domgen.config_hash``, so re-running a command finds finished runs instead of repeating them.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import yaml

from domgen.errors import DomgenError

EXPERIMENTS_DIR = Path(os.environ.get("DOMGEN_EXPERIMENTS", Path(__file__).resolve().parents[1] / "experiments"))


def profile_path(family: str, profile: str) -> Path:
    """``profile`` is a name in experiments/<family>/ or a path to a YAML file."""
    candidate = Path(profile)
    if candidate.suffix in (".yaml", ".yml"):
        return candidate
    return EXPERIMENTS_DIR / family / f"{profile}.yaml"


def load_profile(family: str, profile: str) -> dict:
    path = profile_path(family, profile)
    if not path.is_file():
        known = sorted(p.stem for p in (EXPERIMENTS_DIR / family).glob("*.yaml"))
        raise DomgenError(f"profile file {path} does not exist; use --profile with one of {', '.join(known) or '(none found)'} or a path to a YAML file")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DomgenError(f"profile {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(cfg, dict):
        raise DomgenError(f"profile {path} must be a YAML mapping of settings; fix the file")
    cfg.setdefault("profile", path.stem)
    return cfg


def set_path(cfg: dict, dotted: str, value, known: frozenset[str] | set[str] = frozenset()) -> None:
    """Set ``a.b.c`` in a nested dict; the key must already exist, or be one of ``known`` (the family's settings rows,
    which a profile may leave to their table defaults), so typos are caught."""
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        if dotted in known and part not in node:
            node[part] = {}
        if not isinstance(node.get(part), dict):
            raise DomgenError(f"--set {dotted}: '{part}' is not a section of this profile; see the profile file for the keys")
        node = node[part]
    if parts[-1] not in node and dotted not in known:
        raise DomgenError(f"--set {dotted}: unknown key '{parts[-1]}'; known keys here: {', '.join(sorted(node))}")
    node[parts[-1]] = value


def apply_overrides(cfg: dict, overrides: list[str] | tuple[str, ...] = (), known: frozenset[str] | set[str] = frozenset(),
                    **flat) -> dict:
    """A copy of ``cfg`` with ``key.sub=value`` overrides (values parsed as YAML) and dotted keyword pairs; a key of
    ``known`` (the family's settings rows) may be set where the profile leaves it to its default."""
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise DomgenError(f"--set {item}: expected KEY=VALUE, e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        set_path(out, key.strip(), yaml.safe_load(raw), known)
    for key, value in flat.items():
        if value is not None:
            set_path(out, key, value, known)
    return out


def flatten(cfg: dict, prefix: str = "") -> dict[str, str]:
    """``{"train.lr": "0.001", ...}`` for MLflow params."""
    out: dict[str, str] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out
