"""`vitbatch run` ends cleanly: every run exits with its job's code (0), closing what it opened.

`bench/exit_stress.py` runs the same command a hundred times beside CPU load; here a handful.
"""

from __future__ import annotations

import json
import os

import pytest
from support import run_cli

from orchestrator.stack.demo import write_digits

pytestmark = pytest.mark.integration
RUNS = 3


def test_vitbatch_run_exits_0_every_time_having_closed_everything_it_opened(tiny_model, tmp_path):
    write_digits(tmp_path / "in", limit=8)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}  # embedded: no broker
    env.update(VITBATCH_MODEL_CACHE_DIR=str(tmp_path / "cache"), PYTHONDEVMODE="1")  # unclosed files say so
    for run in range(RUNS):
        output = tmp_path / f"out-{run}"
        result = run_cli(["run", "classify", "--input", str(tmp_path / "in"), "--output", str(output),
                          "--model", str(tiny_model), "--workers", "1"], env)

        assert result.returncode == 0, f"run {run}: exit {result.returncode}\n{result.stderr[-3000:]}"
        assert "succeeded" in result.stdout
        assert json.loads((output / "_SUCCESS.json").read_text())["processed"] == 8
        assert "ResourceWarning" not in result.stderr, result.stderr[-3000:]
