"""The kind registry: every registered job kind has every piece, and nothing has a piece without a kind."""

from __future__ import annotations

import importlib
import typing
from pathlib import Path

import pytest
import typer.main
from pydantic import Field

from orchestrator.errors import SpecError
from orchestrator.jobspec.imagespecs import InferenceSpec, JobBase
from orchestrator.jobspec.jobs import JobSpec, parse_spec
from orchestrator.jobspec.kinds import KINDS, PLANS, JobKind, Unit, job_kind, spec_schema
from orchestrator.jobspec.modelspecs import ModelJobSpec
from orchestrator.jobspec.vectorspecs import VectorSpec

ARCHITECTURE = Path(__file__).parents[2] / "docs" / "architecture.md"


def missing_pieces(kind: JobKind) -> list[str]:
    """What a registered kind lacks of what a new kind must bring (docs/architecture.md, Adding a job kind)."""
    from pydantic import TypeAdapter

    from orchestrator.commands.cli import app as cli
    from workers.celery import app as worker_app
    from workers.jobheads import HEADS

    worker_app.loader.import_default_modules()  # what a worker imports at boot (app.conf.imports)
    commands = typer.main.get_command(cli).commands  # type: ignore[attr-defined]
    static_schema = TypeAdapter(JobSpec).json_schema()["discriminator"]["mapping"]
    pieces = {
        "its spec names it as its kind": kind.spec.model_fields.get("kind") is not None
        and kind.spec.model_fields["kind"].default == kind.name,
        "its spec in the JobSpec union": kind.spec in union_members(JobSpec),
        "an entry in the schema specs are parsed by": kind.name in static_schema,
        "a plan in plans.py": callable(getattr(importlib.import_module(PLANS), kind.plan, None)),
        "a task the worker app registers": kind.task in worker_app.tasks,
        "a worker head (jobheads.HEADS)": not kind.runs_shards or kind.name in HEADS,
        "a `submit` command": kind.name in commands["submit"].commands,
        "a `run` command": kind.name in commands["run"].commands,
        "a row in docs/architecture.md": f"| `{kind.name}` |" in ARCHITECTURE.read_text(),
    }
    return [piece for piece, present in pieces.items() if not present]


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_registered_kind_has_every_piece(name):
    assert missing_pieces(KINDS[name]) == []


class ResizeSpec(JobBase):
    """A kind registered here only: it has a spec and a record, and nothing else."""

    kind: typing.Literal["resize"] = Field("resize", description="Job kind: resize.")


def test_a_kind_registered_without_its_pieces_is_told_each_piece_it_lacks(monkeypatch):
    resize = JobKind("resize", ResizeSpec, "images", "vitbatch.resize_shard", "plan_resize")
    monkeypatch.setitem(KINDS, "resize", resize)
    lacking = {name: missing_pieces(kind) for name, kind in KINDS.items() if missing_pieces(kind)}
    assert lacking == {"resize": [
        "its spec in the JobSpec union", "an entry in the schema specs are parsed by", "a plan in plans.py",
        "a task the worker app registers", "a worker head (jobheads.HEADS)", "a `submit` command",
        "a `run` command", "a row in docs/architecture.md",
    ]}


def test_a_heads_maker_without_a_registered_kind_is_found():
    from workers.jobheads import HEADS

    assert set(HEADS) == {name for name, kind in KINDS.items() if kind.runs_shards}


def union_members(annotation) -> set[type]:
    """The classes of a union, through an `Annotated[...]` wrapper (a family of one kind is its class)."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return {annotation} if isinstance(annotation, type) else set(typing.get_args(annotation))


def test_every_spec_the_union_parses_is_a_registered_kind_and_the_reverse():
    assert union_members(JobSpec) == {kind.spec for kind in KINDS.values()}


def test_a_kind_is_registered_under_its_specs_own_kind():
    for name, kind in KINDS.items():
        assert kind.name == name
        assert kind.spec.model_fields["kind"].default == name


# Each family's union (jobs.JobSpec joins them) holds the specs of the kinds of one unit, and only those:
# InferenceSpec the image shard kinds (`runs_shards`), ModelJobSpec the one-task kinds, VectorSpec the vector kinds.
FAMILIES = {"images": InferenceSpec, "single": ModelJobSpec, "vectors": VectorSpec}


@pytest.mark.parametrize("unit", sorted(FAMILIES))
def test_each_family_union_holds_exactly_the_kinds_of_its_unit(unit):
    assert {kind.spec for kind in KINDS.values() if kind.unit == unit} == union_members(FAMILIES[unit])


def test_the_job_spec_union_is_the_families_together_and_every_unit_has_one():
    assert set(FAMILIES) == set(typing.get_args(Unit))
    assert union_members(JobSpec) == set().union(*(union_members(family) for family in FAMILIES.values()))


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


# Where a kind's name may be compared, or its spec class tested: the registry, the specs, and the modules
# that belong to the vector kinds alone (their plans, their shards) or read an embed job's output.
SPECS = {f"orchestrator/jobspec/{name}.py" for name in ("jobs", "specbase", "imagespecs", "modelspecs", "vectorspecs")}
OWN_MODULES = {"orchestrator/jobspec/kinds.py", *SPECS, "orchestrator/inputs/vectorplan.py",
               "orchestrator/inputs/vectorsource.py", "workers/curation/vectorshards.py"}
LEFT: set[str] = set()  # modules left for a change of their own: none


def kind_dispatch(tree) -> list[int]:
    """Lines that compare something with a kind's name (`spec.kind == "embed"`, `kind in ("dedup", ...)`)
    or test an object against a spec class (`isinstance(spec, EmbedSpec)`)."""
    import ast

    spec_classes = {kind.spec.__name__ for kind in KINDS.values()}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {c.value for c in ast.walk(node) if isinstance(c, ast.Constant) and isinstance(c.value, str)}
            if names & set(KINDS):
                lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance" and len(node.args) == 2:
            if {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} & spec_classes:
                lines.append(node.lineno)
    return lines


def test_no_module_but_a_kinds_own_dispatches_on_its_name_or_spec_class():
    import ast

    root = ARCHITECTURE.parents[1]
    found = {}
    for folder in ("orchestrator", "workers"):
        for path in sorted((root / folder).rglob("*.py")):
            where = str(path.relative_to(root))
            lines = kind_dispatch(ast.parse(path.read_text()))
            if lines and where not in OWN_MODULES | LEFT:
                found[where] = lines
    assert found == {}


def test_the_dispatch_finder_finds_a_name_test_and_a_spec_class_test():
    import ast

    source = 'if spec.kind == "embed":\n    pass\nif isinstance(spec, EmbedSpec | DedupSpec):\n    pass\nif x == "y":\n    pass\n'
    assert kind_dispatch(ast.parse(source)) == [1, 3]
