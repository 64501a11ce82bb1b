"""Bad input through the real stack: odd S3 keys, model options the model cannot meet, --config
from the command line, and every CLI command with Redis or S3 unreachable."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from orchestrator.jobspec.jobs import parse_spec
from orchestrator.lifecycle.states import JobState
from orchestrator.published.results import read_table
from orchestrator.stack.processes import free_port

pytestmark = pytest.mark.integration
ODD_KEYS = ["a#1.png", "b?x=1.png", "c%2Fd.png", "e f.png", "ü-ñ.png", "#lead.png", "sub dir/f#g?.png"]


def _png(value: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (value, 128, 255 - value)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bad-inputs-images")
    for i in range(3):
        (folder / f"{i}.png").write_bytes(_png(40 * i))
    return folder


def _model_copy(tiny_model: Path, dest: Path, **changes) -> Path:
    shutil.copytree(tiny_model, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(changes)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _one_error_line(result, *fragments: str) -> str:
    """The command failed with exit 2 and one line naming the problem, no traceback."""
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert "Traceback" not in text, text
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    for fragment in fragments:
        assert fragment in lines[0], text
    return lines[0]


def test_s3_keys_with_hash_question_mark_percent_space_and_unicode_are_classified(
        workers, client, s3, bucket, tiny_model):
    for i, key in enumerate(ODD_KEYS):
        s3.put_object(Bucket=bucket, Key=f"inputs/odd/{key}", Body=_png(20 * i))
    workers.start("odd-keys")
    output = f"s3://{bucket}/out/odd#x?y=1/"  # urlparse would have cut this to the key 'out/odd'
    spec = parse_spec({"kind": "classify", "input": f"s3://{bucket}/inputs/odd/", "output": output,
                       "model": str(tiny_model), "batch_size": 4, "top_k": 2})
    job_id, summary = client.submit(spec)
    status = client.wait(job_id, timeout_s=240)

    assert status.state is JobState.SUCCEEDED, (status.reason, status.failed_shards)
    rows = read_table(output, client.store).to_pylist()
    assert sorted(row["key"] for row in rows) == sorted(ODD_KEYS)
    assert [row for row in rows if row["error"] is not None] == []
    keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket=bucket, Prefix="out/odd")["Contents"]]
    assert keys and all(key.startswith("out/odd#x?y=1/") for key in keys), keys


def test_attention_layers_beyond_the_models_depth_are_refused_at_submit(cli, images, tiny_model, tmp_path):
    out = tmp_path / "attn"
    result = cli(["submit", "attention", "--input", str(images), "--output", str(out), "--model", str(tiny_model),
                  "--layers", "0,99"])
    _one_error_line(result, "--layers 99", "4 layers")
    assert not out.exists(), "nothing is written for a refused job"


@pytest.mark.parametrize("changes, reason", [
    ({"model_type": "no-such-model"}, "no-such-model"),
    ({"auto_map": {"AutoModelForImageClassification": "modeling_evil.EvilModel"}}, "auto_map"),
])
def test_a_model_directory_transformers_cannot_load_is_refused_at_submit(cli, images, tiny_model, tmp_path,
                                                                         changes, reason):
    model = _model_copy(tiny_model, tmp_path / "model", **changes)
    out = tmp_path / "out"
    result = cli(["submit", "classify", "--input", str(images), "--output", str(out), "--model", str(model)])
    _one_error_line(result, reason)
    assert not out.exists()


@pytest.fixture
def labeled(tmp_path) -> Path:
    for label, value in (("cat", 30), ("dog", 200)):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "train" / label / f"{i}.png").write_bytes(_png(value + i))
    return tmp_path / "train"


@pytest.mark.parametrize("from_file", [False, True])
def test_finetune_config_is_a_json_object_on_the_command_line_or_in_a_file(cli, labeled, tmp_path, from_file):
    config = {"image_size": 32, "patch_size": 4, "hidden_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "intermediate_size": 128}
    argument = json.dumps(config)
    if from_file:
        (tmp_path / "config.json").write_text(argument)
        argument = f"@{tmp_path / 'config.json'}"
    submitted = cli(["submit", "finetune", "--train", str(labeled), "--output", str(tmp_path / "model"),
                     "--config", argument, "--epochs", "1"])
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    record = json.loads(next((tmp_path / "model").rglob("_job.json")).read_text())
    assert record["spec"]["config"] == config
    cancelled = cli(["cancel", job_id])  # the spec was the point; no need to train
    assert cancelled.returncode == 0, cancelled.stderr


def test_a_config_naming_a_checkpoint_file_is_refused_by_the_cli(cli, labeled, tmp_path):
    config = json.dumps({"architecture": "vit_tiny_patch16_224", "checkpoint_path": "/tmp/evil.pth"})
    result = cli(["submit", "finetune", "--train", str(labeled), "--output", str(tmp_path / "m"), "--config", config])
    _one_error_line(result, "checkpoint_path")


@pytest.mark.parametrize("args", [["status", "JOB"], ["wait", "JOB"], ["cancel", "JOB"], ["retry", "JOB"], ["jobs"]])
def test_every_command_prints_one_line_and_exits_2_when_redis_is_down(cli, args):
    """With no outage to ride out (VITBATCH_REDIS_RETRY_S=0): one line, exit 2."""
    down = {"VITBATCH_BROKER_URL": f"redis://:secret-pw@127.0.0.1:{free_port()}/0", "VITBATCH_RESULT_BACKEND": "",
            "VITBATCH_REDIS_RETRY_S": "0"}
    line = _one_error_line(cli(args, extra_env=down, timeout_s=120), "Redis")
    assert "secret-pw" not in line


@pytest.mark.parametrize("args", [["status", "JOB"], ["wait", "JOB"]])
def test_status_and_wait_ride_out_an_outage_then_say_why_they_stopped(cli, args):
    """They retry for VITBATCH_REDIS_RETRY_S, saying so on stderr, then end with the one error line."""
    down = {"VITBATCH_BROKER_URL": f"redis://:secret-pw@127.0.0.1:{free_port()}/0", "VITBATCH_RESULT_BACKEND": "",
            "VITBATCH_REDIS_RETRY_S": "2"}
    result = cli(args, extra_env=down, timeout_s=120)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "retrying for up to 2 s (VITBATCH_REDIS_RETRY_S)" in lines[0]
    assert lines[-1].startswith("error:") and "Redis" in lines[-1] and "secret-pw" not in result.stderr


def test_submit_prints_one_line_and_exits_2_when_s3_is_down(cli, tiny_model, tmp_path):
    down = {"VITBATCH_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}", "VITBATCH_S3_MAX_ATTEMPTS": "1"}
    result = cli(["submit", "classify", "--input", "s3://vitbatch-test/inputs/", "--output", str(tmp_path / "o"),
                  "--model", str(tiny_model)], extra_env=down, timeout_s=120)
    _one_error_line(result)
