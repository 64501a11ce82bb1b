"""What a user meets when something is wrong is one of vitbatch's errors, saying what to do,
and the CLI prints it as one line instead of a traceback."""

from __future__ import annotations

import builtins

import pytest

from orchestrator.commands.cli import main
from orchestrator.config import Settings
from orchestrator.errors import ConfigError, OutputNotFound, ServerNotReady, SpecError, VitbatchError
from orchestrator.fleet.celery_app import make_app
from orchestrator.jobspec.checks.outputs import storable_output
from orchestrator.jobspec.modelrefs import normalize_model_ref, refuse_file_keys
from orchestrator.stack.processes import RedisServer


def test_a_visibility_timeout_below_the_time_limit_is_a_config_error_naming_both_variables():
    settings = Settings(broker_url="redis://127.0.0.1:1/0", visibility_timeout_s=100, task_time_limit_s=600)
    with pytest.raises(ConfigError, match="VITBATCH_VISIBILITY_TIMEOUT_S .* must exceed VITBATCH_TASK_TIME_LIMIT_S"):
        make_app(settings)


def test_the_cli_prints_a_config_error_as_one_line_and_exits_2(monkeypatch, capsys):
    monkeypatch.setenv("VITBATCH_BROKER_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("VITBATCH_VISIBILITY_TIMEOUT_S", "100")
    monkeypatch.setenv("VITBATCH_TASK_TIME_LIMIT_S", "600")
    with pytest.raises(SystemExit) as exit_info:
        main(["status", "some-job"])
    assert exit_info.value.code == 2
    printed = capsys.readouterr().err
    assert "error:" in printed and "raise the first or lower the second" in printed
    assert "Traceback" not in printed


@pytest.mark.parametrize("ref, hint", [
    ("", "model reference is empty"),
    ("hf:", "write hf:<name>"),
    ("hf:not a repo", "neither a Hugging Face repo id"),
    ("ftp://host/model", "use hf:<id>, timm:<name>, a local directory or s3://"),
])
def test_a_bad_model_reference_is_a_spec_error_saying_what_to_write(ref, hint):
    # An alias whose pointer names such a reference reaches Client.submit through this call.
    with pytest.raises(SpecError, match=hint.replace("(", r"\(").replace("[", r"\[")):
        normalize_model_ref(ref)


def test_a_config_that_names_a_file_is_a_spec_error_pointing_at_model():
    with pytest.raises(SpecError, match="checkpoint_path.*pass --model with a safetensors directory"):
        refuse_file_keys({"checkpoint_path": "/tmp/weights.pth"})


@pytest.mark.parametrize("uri, hint", [
    ("file:///tmp/a%01b", "control characters"),
    ("s3://bad bucket/out/", "not a valid S3 bucket name"),
    ("s3://bucket/" + "k" * 900, "choose a shorter prefix"),
])
def test_an_output_the_store_cannot_hold_is_a_spec_error(uri, hint):
    with pytest.raises(SpecError, match=hint):
        storable_output(uri)


def test_reading_results_where_no_job_succeeded_is_output_not_found_not_a_file_error(tmp_path):
    from orchestrator.published.results import read_table

    with pytest.raises(OutputNotFound, match="no succeeded job at"):
        read_table(str(tmp_path / "nothing-here"))


def test_a_redis_server_that_exits_at_start_is_server_not_ready_naming_its_log(tmp_path):
    server = RedisServer(tmp_path / "redis", port=70000)  # no such port: valkey refuses to start
    with pytest.raises(ServerNotReady, match="exited at start: see .*server.log"):
        server.start(timeout_s=10)
    server.stop()


def test_the_demo_without_scikit_learn_says_how_to_install_it(tmp_path, monkeypatch):
    from orchestrator.stack.demo import write_digits

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name.split(".")[0] == "sklearn":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    with pytest.raises(VitbatchError, match="pip install scikit-learn"):
        write_digits(tmp_path / "digits", limit=3)
    assert not (tmp_path / "digits").exists()


def test_the_demo_writes_digits_as_an_image_folder(tmp_path):
    from orchestrator.stack.demo import write_digits

    assert write_digits(tmp_path / "train", limit=12, holdout=tmp_path / "holdout") == 12
    assert len(list((tmp_path / "holdout").rglob("*.png"))) == 2  # every 6th: 0 and 6
    assert len(list((tmp_path / "train").rglob("*.png"))) == 10
    assert {p.name for p in (tmp_path / "train").iterdir()} <= set("0123456789")  # one folder per class
