"""A run's tables as files (Markdown, CSV, LaTeX) and as the MLflow artifacts ``tables/`` of a run.

Here, not in reports/, because a family logs its tables at the end of a round and families sit below reports.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from mlflow.tracking import MlflowClient

from domgen.tracking import mlflow_store as store


def to_markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(str(v) for v in row.tolist()) + " |")
    return "\n".join(lines)


def write_tables(tables: dict[str, pd.DataFrame], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, df in tables.items():
        for suffix, text in ((".md", to_markdown(df)), (".csv", df.to_csv(index=False)),
                             (".tex", df.to_latex(index=False).replace("±", r"$\pm$"))):
            path = folder / f"{name}{suffix}"
            tmp = path.with_suffix(suffix + ".part")
            tmp.write_text(text)
            tmp.replace(path)
            paths.append(path)
    return paths


def log_tables(run_id: str, tables: dict[str, pd.DataFrame]) -> None:
    with store.artifact_dir() as tmp:
        write_tables(tables, tmp / "tables")
        MlflowClient().log_artifacts(run_id, str(tmp / "tables"), "tables")
