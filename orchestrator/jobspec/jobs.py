"""Job specs: the contract between the CLI, the orchestrator and the workers.

One pydantic model per job kind, kept with its family: the image jobs (imagespecs.py), the model
jobs (modelspecs.py) and the vector jobs (vectorspecs.py), on what they share (specbase.py). Each
family names its kinds in a union; `JobSpec` is theirs together, the one a spec is parsed as. What a
kind asks of its model's checkpoint is its spec's own `check_checkpoint` (submit's checks and the
worker call it), so no check elsewhere tests a kind's name.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, TypeAdapter

from orchestrator.errors import SpecError
from orchestrator.jobspec.imagespecs import InferenceSpec
from orchestrator.jobspec.modelspecs import ModelJobSpec
from orchestrator.jobspec.vectorspecs import VectorSpec

JobSpec = Annotated[InferenceSpec | ModelJobSpec | VectorSpec, Field(discriminator="kind")]
_ADAPTER = TypeAdapter(JobSpec)
# What else differs by kind (its task, unit, queue...) is its record in kinds.py, which tests/unit/test_kinds.py
# holds to this union: a spec without a registered kind, or the reverse, fails there.


def parse_spec(data: dict | str) -> JobSpec:
    """A spec from a dict or JSON text, or SpecError with one line per problem."""
    from pydantic import ValidationError

    try:
        if isinstance(data, str):
            return _ADAPTER.validate_json(data)
        return _ADAPTER.validate_python(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}" for err in e.errors()
        )
        raise SpecError(f"invalid job spec: {problems}") from e
