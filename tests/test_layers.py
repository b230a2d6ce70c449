"""The layers of DESIGN.md hold: the former import circles stay broken and import-linter's contract is kept."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def loaded_after_import(module: str) -> set[str]:
    """The domgen modules a fresh interpreter holds after importing ``module`` alone."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('domgen')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    return set(out.stdout.split())


def test_settings_imports_nothing_above_itself():
    assert loaded_after_import("domgen.settings") == {"domgen", "domgen.settings", "domgen.errors"}


def test_readers_and_synthetic_stand_on_spec_not_on_the_registry():
    for module in ("domgen.data.readers", "domgen.data.synthetic", "domgen.data.spec"):
        loaded = loaded_after_import(module)
        assert not loaded & {"domgen.data.registry", "domgen.families.benchmark"}, (module, loaded)
    assert "domgen.data.synthetic" not in loaded_after_import("domgen.data.readers")


@pytest.mark.skipif(shutil.which("lint-imports", path=str(Path(sys.executable).parent)) is None,
                    reason="import-linter is not installed (pip install -e '.[test]')")
def test_import_linter_contract_is_kept():
    out = subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "--no-cache"], cwd=ROOT, capture_output=True,
                         text=True, env={"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)})
    assert out.returncode == 0, out.stdout[-3000:]
    assert "2 kept, 0 broken" in out.stdout
