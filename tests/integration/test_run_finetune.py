"""`vitbatch run finetune` as a user runs it: the embedded stack, one real worker, a model at the output."""

from __future__ import annotations

import json
import os

from support import run_cli

from orchestrator.stack.demo import write_digits

TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 128}


def test_run_finetune_starts_one_worker_for_its_one_task_and_publishes_the_model(tmp_path):
    write_digits(tmp_path / "digits", limit=40)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VITBATCH_")}
    env["VITBATCH_MODEL_CACHE_DIR"] = str(tmp_path / "cache")
    result = run_cli(["run", "finetune", "--train", str(tmp_path / "digits"), "--output", str(tmp_path / "out"),
                      "--config", json.dumps(TINY_VIT), "--epochs", "1", "--batch-size", "16", "--augment", "none",
                      "--val-split", "0"], env)
    assert result.returncode == 0, result.stderr
    # a second worker would have nothing to run, only its start-up to compete with the first's
    assert "starting the embedded stack with 1 worker(s)" in result.stderr
    record = json.loads((tmp_path / "out" / "_SUCCESS.json").read_text())
    model_dir = tmp_path / "out" / record["job_dir"]
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["n_train"] == 40 and metrics["precision"] == "fp32"  # hidden 64: fp32 on every CPU kind
    assert json.loads((model_dir / "config.json").read_text())["hidden_size"] == 64
