"""`vitbatch submit export` on the real stack, then classify with the exported model from S3.

CLI -> Redis -> a real worker process -> the S3-compatible server: the export job writes
its model directory into its job folder, `_SUCCESS.json` names it, and the output prefix
works as `--model` for classify, whose rows match the PyTorch model's.
"""

from __future__ import annotations

import json

import pytest

from orchestrator.published.results import read_table
from orchestrator.stack.demo import write_digits

pytestmark = pytest.mark.integration
N_IMAGES = 24


def _job_id(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_export_then_classify(tmp_path, s3, bucket, upload, tiny_model, workers, cli, client):
    write_digits(tmp_path / "digits", limit=N_IMAGES)
    upload(tmp_path / "digits", bucket, "onnx/digits")
    upload(tiny_model, bucket, "onnx/models/tiny-vit")
    workers.start("onnx-w1")
    images, source = f"s3://{bucket}/onnx/digits/", f"s3://{bucket}/onnx/models/tiny-vit/"
    exported = f"s3://{bucket}/onnx/models/tiny-vit-onnx/"

    job_id = _job_id(cli(["submit", "export", "--model", source, "--output", exported, "--input", images,
                          "--samples", "16"]))
    waited = cli(["wait", job_id])
    assert waited.returncode == 0, waited.stdout + waited.stderr
    record = json.loads(s3.get_object(Bucket=bucket, Key="onnx/models/tiny-vit-onnx/_SUCCESS.json")["Body"].read())
    assert record["model"] == record["job_dir"]
    names = {part["name"].rsplit("/", 1)[-1] for part in record["parts"]}
    assert {"model.onnx", "config.json", "export_report.json"} <= names
    report = json.loads(s3.get_object(Bucket=bucket, Key=f"onnx/models/tiny-vit-onnx/{record['job_dir']}/"
                                                          "export_report.json")["Body"].read())
    assert report["passed"] and report["sample"]["images"] == 16

    refused = cli(["submit", "attention", "--input", images, "--output", f"s3://{bucket}/onnx/out/attn/",
                   "--model", exported])
    assert refused.returncode != 0 and "attention maps need the PyTorch model" in refused.stderr

    outputs = {}
    # The ONNX graph runs in fp32 (--precision does not apply to it): so must its PyTorch reference,
    # not `auto`, which is bf16 on AMX / AVX512-BF16 CPUs.
    for label, model in (("torch", source), ("onnx", exported)):
        out = f"s3://{bucket}/onnx/out/classify-{label}/"
        job = _job_id(cli(["submit", "classify", "--input", images, "--output", out, "--model", model,
                           "--shard-size", "12", "--precision", "fp32"]))
        assert cli(["wait", job]).returncode == 0
        outputs[label] = {row["key"]: row for row in read_table(out, client.store).to_pylist()}
    assert outputs["onnx"].keys() == outputs["torch"].keys() and len(outputs["onnx"]) == N_IMAGES
    for key, row in outputs["torch"].items():
        other = outputs["onnx"][key]
        assert abs(other["score"] - row["score"]) < 1e-4
        if row["topk_scores"][0] - row["topk_scores"][1] > 0.05:
            assert other["label"] == row["label"]
