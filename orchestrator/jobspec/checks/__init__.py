"""Submit-time checks: everything that can be refused before anything is written or enqueued.

- `checks.models`: what a spec asks of its model's config.json (architecture, remote code,
  classifier, labels, layers, ONNX exports) and an export job's checks;
- `checks.training`: the jobs that read labeled data (finetune, evaluate) and the image
  counts their progress is measured in;
- `checks.outputs`: whether an output location can be stored and is free to take.

Each raises SpecError saying what to do instead. The shape of a spec (field types, ranges,
normalized references) is pydantic's, in the specs (specbase.py and the kinds' families); the
checks here read the store. Nothing is imported here, so specbase.py can use `checks.outputs`
without importing the checks that take its specs.
"""
