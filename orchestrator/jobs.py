"""Job specs: the contract between the CLI, the orchestrator and the workers.

One pydantic model per job kind. Every field has a description: it becomes the
`--help` text and the JSON schema (`vitbatch schema`).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal
from urllib.parse import unquote

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from orchestrator.errors import SpecError, StorageError
from orchestrator.storage import normalize_uri

Precision = Literal["auto", "fp16", "bf16", "fp32"]
Decode = Literal["auto", "threads", "processes", "device"]
Device = Literal["auto", "cpu", "cuda"]

_MODEL_SCHEMES = ("hf:", "timm:", "s3://", "file://")
_HF_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def normalize_model_ref(ref: str) -> str:
    """Validate a model reference; local directories become absolute file:// URIs."""
    ref = ref.strip()
    if not ref:
        raise ValueError("model reference is empty")
    if ref.startswith(("hf:", "timm:")):
        scheme, _, name = ref.partition(":")
        if not name:
            raise ValueError(f"model reference {ref!r} names no model: write {scheme}:<name>")
        if name.startswith(("/", ".", "~")) or name.startswith("file://"):
            return f"{scheme}:{normalize_uri(name.rstrip('/'))}"
        if scheme == "hf" and not _HF_REPO_ID.match(name):
            raise ValueError(f"{ref!r} is neither a Hugging Face repo id (org/name) nor a local directory")
        return ref
    if ref.startswith("alias:"):
        return "alias:" + normalize_uri(ref.split(":", 1)[1])
    if ref.startswith("s3://"):
        return normalize_uri(ref).rstrip("/") + "/"
    if ref.startswith("file://"):
        return normalize_uri(ref).rstrip("/")
    if "://" in ref:
        raise ValueError(f"model reference {ref!r}: use hf:<id>, timm:<name>, a local directory or s3://")
    return normalize_uri(ref.rstrip("/"))


_S3_BUCKET = re.compile(r"^[A-Za-z0-9._-]{1,255}$")  # what any S3 store takes (AWS today: stricter)
_S3_KEY_BYTES = 1024  # S3's limit on a whole key
_OUTPUT_ROOM = 200  # what vitbatch appends under an output prefix (_jobs/<id>/_manifests/shard-NNNNN.jsonl, ...)
_NAME_BYTES = 255  # one file name on Linux file systems
_LOCAL_PATH_BYTES = 4096


def storable_output(uri: str) -> str:
    """A canonical output URI, or ValueError saying which character or length its store cannot hold.

    `#`, `?`, `%`, spaces and unicode are fine (keys are kept as written); control characters
    are not (S3 listings are XML, and a terminal would hide them), nor a key or file name
    longer than the store allows once vitbatch's own names are appended.
    """
    text = unquote(uri[len("file://"):]) if uri.startswith("file://") else uri
    bad = sorted({f"U+{ord(c):04X}" for c in text if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise ValueError(f"output {uri!r} holds control characters ({', '.join(bad)}): choose a name without them")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not _S3_BUCKET.match(bucket):
            raise ValueError(f"output bucket {bucket!r} is not a valid S3 bucket name (letters, digits, "
                             "'.', '-' and '_' only)")
        if len(key.encode()) > _S3_KEY_BYTES - _OUTPUT_ROOM:
            raise ValueError(f"output prefix is {len(key.encode())} bytes: S3 keys hold {_S3_KEY_BYTES}, and vitbatch "
                             f"needs {_OUTPUT_ROOM} of them for its own names; choose a shorter prefix")
        return uri
    path = text
    longest = max(path.split("/"), key=lambda part: len(part.encode()))
    if len(longest.encode()) > _NAME_BYTES:
        raise ValueError(f"output folder name {longest[:40]!r}... is {len(longest.encode())} bytes: file names "
                         f"hold at most {_NAME_BYTES}")
    if len(path.encode()) > _LOCAL_PATH_BYTES - _OUTPUT_ROOM:
        raise ValueError(f"output path is {len(path.encode())} bytes: too long for the files vitbatch writes under it")
    return uri


_FILE_KEYS = frozenset({"checkpoint_path", "pretrained", "pretrained_model_name_or_path", "name_or_path",
                        "_name_or_path", "cache_dir"})
_FILE_SUFFIXES = ("_path", "_file", "_dir", "_url")
_CFG_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay")  # fine for mean/std; not for where weights come from
_CFG_SOURCES = frozenset({"file", "url", "hf_hub_id", "hf_hub_filename", "source", "state_dict"})


def refuse_file_keys(config: dict) -> None:
    """A --config builds a model from scratch; a key that names a file or a download (timm's
    `checkpoint_path`, `pretrained_cfg_overlay={"file": ...}`) would load weights, pickle
    included, from wherever it points, so it is refused (ValueError says which)."""
    named = [key for key in config if key in _FILE_KEYS or str(key).endswith(_FILE_SUFFIXES)]
    for key in _CFG_KEYS:
        cfg = config.get(key)
        if isinstance(cfg, str) or (isinstance(cfg, dict) and _CFG_SOURCES & set(cfg)):
            named.append(key + (f" ({', '.join(sorted(_CFG_SOURCES & set(cfg)))})" if isinstance(cfg, dict) else ""))
    named.sort()
    if named:
        raise ValueError(f"--config may not name files or downloads ({', '.join(named)}): it builds an untrained "
                         "model; to start from weights pass --model with a safetensors directory")


def _checked_uri(value: str) -> str:
    """normalize_uri for validators: pydantic reports ValueError as a field error."""
    try:
        return normalize_uri(value)
    except StorageError as e:
        raise ValueError(str(e)) from e


class JobBase(BaseModel):
    """Options every inference job shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str = Field(
        description="Images: a local directory, file:// or s3:// prefix, or a manifest file "
        "(.txt one key per line, .jsonl with a 'key' field)."
    )
    output: str = Field(description="Output prefix (local directory, file:// or s3://).")
    model: str = Field(
        description="hf:<repo id or dir>, timm:<name or dir>, a local save_pretrained directory, or s3:// directory."
    )
    batch_size: int | None = Field(
        None, gt=0, le=4096, description="Images per forward pass; unset = 256 on CUDA (halved on out-of-memory), "
        "16 on a CPU, where cache-sized batches run faster.",
    )
    shard_size: int = Field(1000, gt=0, le=1_000_000, description="Images per shard (one task per shard).")
    precision: Precision = Field(
        "auto", description="Compute dtype; auto = fp16 on CUDA, bf16 on CPUs with AMX, else fp32."
    )
    device: Device = Field("auto", description="auto picks CUDA when the worker has it.")
    read_concurrency: int = Field(16, gt=0, le=256, description="Concurrent object reads per worker.")
    compile: bool = Field(False, description="torch.compile the model (slower start, faster steady state).")
    decode: Decode = Field(
        "auto", description="Where images are decoded: threads, processes (past the GIL), or device (nvJPEG "
        "on CUDA for baseline JPEGs, the rest in processes); auto = device on CUDA, threads on CPU.",
    )
    lane: Literal["auto", "interactive", "bulk"] = Field(
        "auto", description="Queue lane; auto = interactive for small jobs, bulk otherwise (nightly runs use bulk)."
    )

    @field_validator("input", "output")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _checked_uri(value)

    @field_validator("output")
    @classmethod
    def _storable(cls, value: str) -> str:
        return storable_output(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return normalize_model_ref(value)


class ClassifySpec(JobBase):
    """Top-k labels for every image."""

    kind: Literal["classify"] = Field("classify", description="Job kind: classify.")
    top_k: int = Field(5, gt=0, le=1000, description="Labels and scores kept per image.")


Pooling = Literal["cls", "mean", "patches"]


class EmbedSpec(JobBase):
    """Embeddings of the final normalized hidden state: CLS, mean of patches, or every patch token."""

    kind: Literal["embed"] = Field("embed", description="Job kind: embed.")
    pooling: list[Pooling] = Field(
        default_factory=lambda: ["cls"], min_length=1,
        description="Any of cls, mean, patches (patches stores [N, grid*grid, hidden] per shard: large).",
    )

    @field_validator("pooling", mode="before")
    @classmethod
    def _split(cls, value):
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @field_validator("pooling")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class AttentionSpec(JobBase):
    """CLS-to-patch attention maps per layer, attention rollout, and PNG overlays."""

    kind: Literal["attention"] = Field("attention", description="Job kind: attention.")
    layers: list[int] = Field(
        default_factory=lambda: [-1], min_length=1,
        description="Layers whose CLS-to-patch map is stored; negative counts from the last (-1 = last).",
    )
    heads: Literal["mean", "all"] = Field("mean", description="Average the heads, or keep each head's map.")
    rollout: bool = Field(True, description="Also store attention rollout across all layers.")
    max_overlays: int | None = Field(
        None, ge=0, description="PNG overlays for the first N images of the job; unset = every image."
    )

    @field_validator("layers", mode="before")
    @classmethod
    def _split(cls, value):
        return [int(p) for p in value.split(",") if p.strip()] if isinstance(value, str) else value


class TrainBase(BaseModel):
    """Options shared by the jobs that read labeled data."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str = Field(description="Output prefix (local directory, file:// or s3://).")
    batch_size: int = Field(32, gt=0, le=4096, description="Images per step (per forward pass for evaluate).")
    precision: Precision = Field("auto", description="bf16 on CPUs/GPUs that support it, fp16, or fp32.")
    device: Device = Field("auto", description="auto picks CUDA when the worker has it.")
    seed: int = Field(0, description="Seed for splits, initialization, augmentation and data order.")

    @field_validator("output")
    @classmethod
    def _uri(cls, value: str) -> str:
        return storable_output(_checked_uri(value))


class FinetuneSpec(TrainBase):
    """Fine-tune (or train from a config) an image classifier on labeled images."""

    kind: Literal["finetune"] = Field("finetune", description="Job kind: finetune.")
    train: str = Field(description="Labeled images: an ImageFolder prefix (one folder per class) or a CSV/JSONL manifest (key,label).")
    val: str | None = Field(None, description="Labeled validation images (same layouts); unset = --val-split of train.")
    val_split: float = Field(0.1, ge=0.0, lt=0.9, description="Stratified, seeded share of train used for validation when --val is unset.")
    model: str | None = Field(None, description="Pretrained starting point (hf:, timm:, local or s3:// dir); or use --config.")
    config: dict | None = Field(
        None, description="JSON of a custom architecture trained from scratch: ViTConfig fields (HF), "
        "or {\"architecture\": timm name, ...create_model kwargs} for timm.",
    )
    epochs: float = Field(3.0, gt=0, le=1000, description="Passes over the training set.")
    lr: float = Field(5e-5, gt=0, lt=1, description="Peak learning rate (AdamW, linear warmup then decay).")
    weight_decay: float = Field(0.05, ge=0, lt=1, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.1, ge=0, lt=1, description="Share of steps spent warming up the learning rate.")
    freeze_backbone: bool = Field(False, description="Train only the classifier head.")
    augment: Literal["none", "basic", "randaugment"] = Field(
        "basic", description="none; basic = random resized crop + flip; randaugment = timm rand-m9-mstd0.5-inc1 + random erasing.",
    )
    checkpoint_every_steps: int = Field(200, gt=0, description="Upload a resumable checkpoint every N steps.")
    alias: str | None = Field(
        None, description="Pointer object (e.g. s3://b/models/latest) set to this model when training succeeds; "
        "jobs with --model alias:<that URI> follow it.",
    )

    @field_validator("train", "val", "alias")
    @classmethod
    def _data_uri(cls, value: str | None) -> str | None:
        return None if value is None else _checked_uri(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return None if value is None else normalize_model_ref(value)

    @field_validator("config", mode="before")
    @classmethod
    def _json(cls, value):
        if isinstance(value, str):
            import json

            try:
                return json.loads(value)
            except ValueError as e:
                raise ValueError(f"--config is not valid JSON: {e}") from e
        return value

    @field_validator("config")
    @classmethod
    def _no_files(cls, value: dict | None) -> dict | None:
        if value is not None:
            refuse_file_keys(value)
        return value

    @model_validator(mode="after")
    def _one_start(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of --model (pretrained) or --config (from scratch)")
        return self


class EvaluateSpec(TrainBase):
    """Accuracy, top-5, per-class report and confusion matrix of a model on labeled images."""

    kind: Literal["evaluate"] = Field("evaluate", description="Job kind: evaluate.")
    input: str = Field(description="Labeled images: an ImageFolder prefix or a CSV/JSONL manifest (key,label).")
    model: str = Field(description="hf:, timm:, a local save_pretrained directory, or s3:// directory.")
    batch_size: int = Field(64, gt=0, le=4096, description="Images per forward pass.")

    @field_validator("input")
    @classmethod
    def _input(cls, value: str) -> str:
        return _checked_uri(value)

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return normalize_model_ref(value)


class ExportSpec(BaseModel):
    """Export a PyTorch model to an ONNX model directory (optionally int8), checked against PyTorch."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["export"] = Field("export", description="Job kind: export.")
    model: str = Field(description="The PyTorch model to export: hf:, timm:, a local save_pretrained or timm "
                       "save_for_hf directory, or s3:// directory (not an ONNX export).")
    output: str = Field(description="Output prefix (local directory, file:// or s3://); use it as --model afterwards.")
    input: str | None = Field(
        None, description="Images for the parity check (same layouts as classify's --input); unset = deterministic "
        "synthetic images, which check the graph but not your data.",
    )
    samples: int = Field(64, gt=0, le=4096, description="Images the parity check runs (spread over --input).")
    quantize: Literal["none", "int8"] = Field(
        "none", description="int8 = ONNX Runtime dynamic quantization: int8 weights, activations quantized at run "
        "time; the report gives its own parity figures.",
    )
    opset: int = Field(18, ge=17, le=23, description="ONNX opset (>= 17 keeps LayerNorm one op).")
    device: Device = Field("auto", description="Where ONNX Runtime runs the parity check (CUDA where the worker has "
                           "onnxruntime-gpu and a GPU); the PyTorch reference always runs in fp32 on the CPU.")
    fp32_tolerance: float = Field(
        1e-3, gt=0, lt=1, description="Largest allowed max |ONNX - PyTorch| logit difference of the fp32 export, "
        "as a fraction of the sample's largest |logit|; the job fails above it.",
    )
    int8_min_agreement: float = Field(
        0.95, ge=0, le=1, description="Least top-1 agreement of the int8 model with PyTorch fp32 on decisive "
        "sample images (top-2 probability margin > 0.05); the job fails below it.",
    )

    @field_validator("input")
    @classmethod
    def _input(cls, value: str | None) -> str | None:
        return None if value is None else _checked_uri(value)

    @field_validator("output")
    @classmethod
    def _output(cls, value: str) -> str:
        return storable_output(_checked_uri(value))

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return normalize_model_ref(value)


JobSpec = Annotated[
    ClassifySpec | EmbedSpec | AttentionSpec | FinetuneSpec | EvaluateSpec | ExportSpec, Field(discriminator="kind")
]
_ADAPTER = TypeAdapter(JobSpec)
JOB_KINDS = ("classify", "embed", "attention", "finetune", "evaluate", "export")
SPEC_CLASSES = {"classify": ClassifySpec, "embed": EmbedSpec, "attention": AttentionSpec,
                "finetune": FinetuneSpec, "evaluate": EvaluateSpec, "export": ExportSpec}


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
