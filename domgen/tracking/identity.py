"""Run identity, in one place: a run is found again by the hash of what defines it (its resolved config with the
contents of the files it reads) plus what picks it among its siblings, stored as its MLflow tag ``domgen.config_hash``.

What a family feeds in (the hashed view of its config, its datasets' digests) is made in ``domgen.families.common``,
which reads the data; the hashing itself lives here so tracking, which tags and finds runs, never imports the data.
"""
from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

from domgen.errors import DomgenError


# Bumped when domgen computes other numbers from an unchanged config, so finished runs of the older computation are
# not found again (and mixed into a resumed round). 2: a slice's augmentation is drawn from (seed, epoch, index).
# 3: Bizopoulos et al.'s Eq. 1 loss and Eq. 4 Dice take eps in the denominator only (it was in the numerator too).
# 4: each transform of a slice's augmentation draws from its own seed (albumentations gave them all one seed, so
#    their draws coincided: Bizopoulos's two flips always together, Enshaei's flip only with the affine).
RESULTS_VERSION = 4


def config_hash(cfg: dict) -> str:
    """Short, stable hash of a resolved config (key order does not matter) and of ``RESULTS_VERSION``."""
    blob = json.dumps({"config": cfg, "results_version": RESULTS_VERSION}, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def child_hash(cfg: dict, **identity) -> str:
    """A child run's identity: the round's (hashed) config plus what picks the child (fold, phase, target, ...)."""
    return config_hash({"config": cfg, **identity})


@functools.lru_cache(maxsize=4096)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's contents (cached per path, size and modification time)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DomgenError(f"{path} does not exist; pass an existing file")
    stat = path.stat()
    return _file_sha256(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
