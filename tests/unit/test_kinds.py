"""The kind registry: every registered job kind has every piece, and nothing has a piece without a kind."""

from __future__ import annotations

import typing

import pytest
import typer.main

from orchestrator.errors import SpecError
from orchestrator.jobspec.jobs import InferenceSpec, JobSpec, parse_spec
from orchestrator.jobspec.kinds import KINDS, job_kind, spec_schema


def union_members(annotation) -> set[type]:
    """The classes of a union, through an `Annotated[...]` wrapper."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return set(typing.get_args(annotation))


def test_every_spec_the_union_parses_is_a_registered_kind_and_the_reverse():
    assert union_members(JobSpec) == {kind.spec for kind in KINDS.values()}


def test_a_kind_is_registered_under_its_specs_own_kind():
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.spec.model_fields["kind"].default == name


def test_the_image_shard_kinds_are_exactly_the_inference_specs():
    assert {kind.spec for kind in KINDS.values() if kind.runs_shards} == union_members(InferenceSpec)


def test_every_kinds_task_is_one_the_worker_app_registers():
    from workers.celery import app

    app.loader.import_default_modules()  # what a worker imports at boot (app.conf.imports)
    missing = {name: kind.task for name, kind in KINDS.items() if kind.task not in app.tasks}
    assert missing == {}


def test_every_kind_is_a_submit_and_a_run_command():
    from orchestrator.commands.cli import app

    commands = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    for group in ("submit", "run"):
        assert set(commands[group].commands) == set(KINDS), group


def test_every_kind_is_in_the_schema_and_the_schema_is_the_one_specs_are_parsed_by():
    from pydantic import TypeAdapter

    schema = spec_schema()
    assert set(schema["discriminator"]["mapping"]) == set(KINDS)
    assert schema == TypeAdapter(JobSpec).json_schema()


def test_the_worker_metrics_cover_the_kinds_whose_shards_the_runner_serves():
    from workers.metrics import SHARD_KINDS

    assert set(SHARD_KINDS) == {"classify", "embed", "attention"}


@pytest.mark.parametrize(("name", "args"), [("classify", ["j", 3]), ("dedup", ["j", 3]), ("export", ["j"])])
def test_a_single_task_kind_takes_the_job_only_and_a_sharded_one_the_shard_too(name, args):
    assert KINDS[name].task_args("j", 3) == args


def test_an_unknown_kind_is_refused_with_the_kinds_there_are():
    with pytest.raises(SpecError, match="unknown job kind 'resize': one of classify, embed"):
        job_kind("resize")


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_spec_parser_knows_every_registered_kind_by_name(name):
    with pytest.raises(SpecError) as refused:  # refused for its missing options, not for its kind
        parse_spec({"kind": name})
    assert "output" in str(refused.value)
    assert "tag" not in str(refused.value)


def test_a_kind_the_parser_does_not_know_is_refused_by_its_tag():
    with pytest.raises(SpecError, match="tag"):
        parse_spec({"kind": "resize"})
