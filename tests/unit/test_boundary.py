"""The one-way split: orchestrator never imports workers, torch, transformers or timm."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import orchestrator

ORCHESTRATOR = Path(orchestrator.__file__).parent
HEAVY = ("torch", "transformers", "timm", "workers")

IMPORT_EVERYTHING = f"""
import importlib, pkgutil, sys
import orchestrator, orchestrator.commands.cli, orchestrator.submission.submit, orchestrator.jobspec.jobs, orchestrator.inputs.planner
import orchestrator.published.results, orchestrator.stack.embedded
for module in pkgutil.iter_modules(orchestrator.__path__):
    importlib.import_module("orchestrator." + module.name)
loaded = sorted(name for name in {HEAVY!r} if name in sys.modules)
print("loaded:", loaded)
sys.exit(1 if loaded else 0)
"""


def test_importing_every_orchestrator_module_leaves_torch_transformers_and_timm_unloaded():
    result = subprocess.run([sys.executable, "-c", IMPORT_EVERYTHING], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "loaded: []" in result.stdout


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules.add(node.module)
    return modules


def test_no_orchestrator_file_imports_workers_or_torch_even_lazily():
    files = sorted(ORCHESTRATOR.rglob("*.py"))
    assert len(files) > 5  # the scan really looked at the package
    offenders = {
        str(path.relative_to(ORCHESTRATOR)): sorted(m for m in imported_modules(path) if m.split(".")[0] in HEAVY)
        for path in files
    }
    assert {name: mods for name, mods in offenders.items() if mods} == {}


def test_the_import_scan_sees_imports_inside_functions(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from workers.models import load\n    import torch.nn\n")
    assert imported_modules(sample) == {"workers.models", "torch.nn"}


IMPORT_SHARD_PATH = """
import sys
import workers.runner, workers.inprocess, workers.lifecycle, workers.models, workers.families
print("celery" in sys.modules, "workers.celery" in sys.modules)
"""


def test_importing_the_shard_path_builds_no_celery_app():
    """Tests, bench and the in-process path import the shard function and the unit lifecycle without a broker
    or Celery's signals."""
    result = subprocess.run([sys.executable, "-c", IMPORT_SHARD_PATH], capture_output=True, text=True, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "VITBATCH_VISIBILITY_TIMEOUT_S": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]


def test_celery_finds_the_app_under_the_workers_package():
    """`celery -A workers worker` (README, docker) still finds the app, by Celery's own lookup."""
    result = subprocess.run([sys.executable, "-c", "from celery.app.utils import find_app; app = find_app('workers'); "
                             "print(type(app).__name__, app.conf.imports)"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    name, imports = result.stdout.split(" ", 1)
    assert name == "Celery" and "'workers.tasks'" in imports
