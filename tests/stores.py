"""Fresh MLflow SQLite stores for the tests: a copy of one empty store that MLflow itself created and migrated (once
per pytest process). MLflow runs its 68 schema migrations on every new SQLite file, about 2 s on CI's cores, and the
suite opens dozens of fresh stores; a copy is the same file MLflow would write. Only for tests that expect a store:
those that check a refusal leaves none use a path that does not exist yet."""
from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

_template: Path | None = None


def _made_by_mlflow() -> Path:
    global _template
    if _template is None:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        folder = Path(tempfile.mkdtemp(prefix="domgen-mlflow-template-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        made = SqlAlchemyStore(f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri())
        made.engine.dispose()
        _template = folder / "mlflow.db"
    return _template


def sqlite_store(path) -> str:
    """``sqlite:///PATH`` of a new, empty MLflow store at ``path`` (``path`` must not exist yet)."""
    path = Path(path)
    assert not path.exists(), f"{path} exists: a fresh store is for a new path"
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_made_by_mlflow(), path)
    return f"sqlite:///{path}"
