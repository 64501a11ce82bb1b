"""Job specs: the contract between the CLI, the orchestrator and the workers.

One pydantic model per job kind. Every field has a description: it becomes the
`--help` text and the JSON schema (`vitbatch schema`). What a kind asks of its model's
checkpoint is its spec's own `check_checkpoint` (submit's checks and the worker call it), so
no check elsewhere tests a kind's name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, field_validator, model_validator

from orchestrator.errors import SpecError, VitbatchError
from orchestrator.jobspec.checks.outputs import storable_output
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind, classifier_refusal
from orchestrator.jobspec.modelrefs import normalize_model_ref, refuse_file_keys
from orchestrator.store.storage import normalize_uri

Precision = Literal["auto", "fp16", "bf16", "fp32"]
Decode = Literal["auto", "threads", "processes", "device"]
Device = Literal["auto", "cpu", "cuda"]
T = TypeVar("T")
R = TypeVar("R")


def _checked(check: Callable[[T], R], value: T) -> R:
    """`check(value)` for a validator: pydantic reports a ValueError as a field error."""
    try:
        return check(value)
    except VitbatchError as e:
        raise ValueError(str(e)) from e


def _field_value(check: Callable[[T], R], value: T | None) -> R | None:
    """`_checked` for a field that may be unset (None passes)."""
    return None if value is None else _checked(check, value)


def read_labels(value: str) -> list[str]:
    """`a,b,c`, or `@file.txt` with one label per line (blank lines skipped)."""
    if value.startswith("@"):
        from pathlib import Path

        try:
            text = Path(value[1:]).expanduser().read_text()
        except OSError as e:
            raise SpecError(f"--labels {value}: cannot read the file ({e.strerror or e})") from e
        return [line.strip() for line in text.splitlines() if line.strip()]
    return [label.strip() for label in value.split(",")]


def _output_uri(value: str) -> str:
    return storable_output(normalize_uri(value))


def _refuse_onnx(model: str, needs: str, config: dict | None) -> None:
    """SpecError for a job that needs the PyTorch model when `config` describes an ONNX export."""
    source = (config or {}).get("source", {}).get("ref", "its source")
    raise SpecError(f"model {model!r} is an ONNX export: {needs}; pass the model it was exported from ({source})")


def _needs_classifier(model: str, checkpoint: Checkpoint) -> None:
    if not checkpoint.classifier:
        raise SpecError(classifier_refusal(model, checkpoint))


class _Spec(BaseModel):
    """The rules every spec applies to the fields it has: locations, the output and the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("input", "train", "val", "alias", "kept_by", "image_root", check_fields=False)
    @classmethod
    def _location(cls, value: str | None) -> str | None:
        return _field_value(normalize_uri, value)

    @field_validator("output", check_fields=False)
    @classmethod
    def _output(cls, value: str) -> str:
        return _checked(_output_uri, value)

    @field_validator("model", check_fields=False)
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        return _field_value(normalize_model_ref, value)

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """SpecError when the checkpoint (and its config.json, where read) cannot serve this kind of job.
        Each kind that asks something of its model says what; the rest ask nothing."""


class JobBase(_Spec):
    """Options every inference job shares."""

    input: str = Field(
        description="Images: a local directory, file:// or s3:// prefix, or a manifest file "
        "(.txt one key per line, .jsonl with a 'key' field); .tar and .parquet objects there are read too."
    )
    output: str = Field(description="Output prefix (local directory, file:// or s3://).")
    model: str = Field(
        description="hf:<repo id or dir>, timm:<name or dir>, a local save_pretrained directory, or s3:// directory."
    )
    image_column: str | None = Field(
        None, description="Parquet inputs: the image column (binary, or a struct with bytes and path); unset = the "
        "column the file's huggingface metadata types as Image, else its only binary or struct{bytes, path} column.",
    )
    id_column: str | None = Field(
        None, description="Parquet inputs: key each row by this column (img2dataset's key) instead of "
        "<file key>/<row index>; webdataset tars: by this field of each sample (a member such as cls, or a field "
        "of its .json member: key, json.key) instead of <tar key>/<sample key>.",
    )
    image_key: str | None = Field(
        None, description="Webdataset tars: the sample's field that holds its image (e.g. jpg, seg.png); unset = "
        "the first of jpg, jpeg, png, webp, gif, bmp, tif, tiff the sample has.",
    )
    image_root: str | None = Field(
        None, description="Parquet and datasets inputs: a folder (local, file:// or s3://) that `path` cells (a "
        "datasets Image stored by reference, often an absolute path) may point into besides --input; the job reads "
        "images there and nowhere else. Unset = only paths inside --input are read.",
    )
    kept_by: str | None = Field(
        None, description="Only the images a dedup job kept: its output prefix or job folder (run it on the embed "
        "output of this same --input); image files only, not tars or parquet rows.",
    )
    keep_columns: list[str] = Field(
        default_factory=list, description="Parquet inputs: columns copied into the output rows (classify parquet, "
        "embed and attention index), comma-separated, e.g. url,caption; one named like an output column is "
        "written as input_<name>. Webdataset tars: fields of each sample, as text (bytes for binary members): "
        "a member (txt, cls, json) or a field of its .json member (caption, json.caption, json.a.b).",
    )
    batch_size: int | None = Field(
        None, gt=0, le=4096, description="Images per forward pass; unset = 256 on CUDA (halved on out-of-memory), "
        "16 on a CPU, where cache-sized batches run faster.",
    )
    shard_size: int = Field(1000, gt=0, le=1_000_000, description="Images per shard (one task per shard).")
    precision: Precision = Field(
        "auto", description="Compute dtype; auto = fp16 on CUDA, bf16 on CPUs with AMX or AVX512-BF16, else fp32."
    )
    device: Device = Field("auto", description="auto picks CUDA when the worker has it.")
    read_concurrency: int = Field(16, gt=0, le=256, description="Concurrent object reads per worker.")
    compile: bool = Field(False, description="torch.compile the model as one static graph, short batches padded "
                          "(slower start, a faster model; on a 2-core CPU no faster end to end: bench/RESULTS.md).")
    decode: Decode = Field(
        "auto", description="Where images are decoded: threads, processes (past the GIL), or device (nvJPEG "
        "on CUDA for baseline JPEGs, the rest in processes); auto = device on CUDA, threads on CPU.",
    )
    jpeg_decode: Literal["exact", "fast"] = Field(
        "exact", description="exact = every JPEG decoded at full scale, so the pixels are the checkpoint's own "
        "processor's; fast = a JPEG at least twice the model's resize target decoded at a reduced DCT scale "
        "(PIL draft: 1600x1200 photos decode about 4x faster, their pixels about a grey level off; python -m "
        "bench.decode --size 1600x1200). The job record and markers say which.",
    )
    lane: Literal["auto", "interactive", "bulk"] = Field(
        "auto", description="Queue lane; auto = interactive for small jobs, bulk otherwise (nightly runs use bulk)."
    )

    @field_validator("keep_columns", mode="before")
    @classmethod
    def _column_list(cls, value):
        return [c.strip() for c in value.split(",") if c.strip()] if isinstance(value, str) else value

    @field_validator("keep_columns")
    @classmethod
    def _distinct_columns(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))


class ClassifySpec(JobBase):
    """Top-k labels for every image."""

    kind: Literal["classify"] = Field("classify", description="Job kind: classify.")
    top_k: int = Field(5, gt=0, le=1000, description="Labels and scores kept per image (at most the labels there are).")
    labels: list[str] | None = Field(
        None, min_length=1, max_length=10_000,
        description="Zero-shot classify with an image-text model (CLIP, SigLIP): the candidate labels, comma-separated "
        "(\"cat,dog,car\") or @file.txt (one per line); images are ranked by the model's own image-text scores.",
    )
    prompt: str = Field(
        "a photo of a {}.", description="Zero-shot prompt template; {} is replaced by each label.",
    )

    @field_validator("labels", mode="before")
    @classmethod
    def _label_list(cls, value):
        return _field_value(read_labels, value) if isinstance(value, str) else value

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        labels = [label.strip() for label in value]
        if any(not label for label in labels) or len(set(labels)) != len(labels):
            raise ValueError("--labels must be distinct and non-empty")
        return labels

    @field_validator("prompt")
    @classmethod
    def _template(cls, value: str) -> str:
        if value.count("{}") != 1 or "{" in value.replace("{}", "") or "}" in value.replace("{}", ""):
            raise ValueError("--prompt must hold exactly one {} (where the label goes) and no other braces")
        return value

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """Zero-shot --labels need an image-text model; without them, a trained classifier."""
        if self.labels is None:
            _needs_classifier(self.model, checkpoint)
        elif not checkpoint.zero_shot:
            raise SpecError(f"model {self.model!r} is a {checkpoint.model_kind.value} ({checkpoint.architecture}): "
                            "zero-shot --labels needs an image-text model (CLIPModel, SiglipModel); drop --labels to "
                            "use its own classifier")

    @model_validator(mode="after")
    def _top_k_within_labels(self):
        if self.labels is not None and self.top_k > len(self.labels):
            raise ValueError(f"top_k={self.top_k} is larger than the {len(self.labels)} --labels: "
                             f"pass --top-k {len(self.labels)} or less")
        return self


Pooling = Literal["cls", "pooled", "mean", "patches"]


def _cls_pooling() -> list[Pooling]:
    return ["cls"]


class EmbedSpec(JobBase):
    """Embeddings of the final normalized hidden state: CLS, mean of patches, or every patch token."""

    kind: Literal["embed"] = Field("embed", description="Job kind: embed.")
    pooling: list[Pooling] = Field(
        default_factory=_cls_pooling, min_length=1,
        description="Any of cls (the model's image embedding: CLS token, or CLIP's projected / SigLIP's pooled "
        "output), pooled (the unprojected pooled output of CLIP-like models), mean (of the patch tokens), "
        "patches ([N, grid*grid, hidden] per shard: large).",
    )
    normalize: bool = Field(False, description="Store unit-length cls, pooled and mean vectors (patches unchanged).")
    parquet_vectors: Literal["off", "float16", "float32"] = Field(
        "off", description="Also write each shard's vectors as parquet (vectors/part-NNNNN.parquet: key and one "
        "fixed_size_list column per --pooling, of this dtype), beside the npy arrays.",
    )

    @field_validator("pooling", mode="before")
    @classmethod
    def _split(cls, value):
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @field_validator("pooling")
    @classmethod
    def _dedupe(cls, value: list[str]) -> list[str]:
        return list(dict.fromkeys(value))

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """--pooling pooled needs a pooled output apart from `cls` (an ONNX export lists its outputs)."""
        if "pooled" not in self.pooling:
            return
        if checkpoint.model_kind is ModelKind.ONNX and config is not None and "pooled" not in (config.get("outputs") or {}):
            raise SpecError(f"model {self.model!r} is an ONNX export without a pooled output apart from its `cls` "
                            "embedding (only CLIP, SigLIP and timm image projections have one): drop `pooled` from "
                            "--pooling")
        if checkpoint.model_kind not in (ModelKind.DUAL, ModelKind.VISION_TOWER, ModelKind.TIMM, ModelKind.ONNX):
            raise SpecError(f"model {self.model!r} ({checkpoint.model_kind.value}) has no pooled output apart from its "
                            "`cls` embedding: drop `pooled` from --pooling")


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

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """Attention maps are the PyTorch model's softmax weights, which an ONNX graph does not output."""
        if checkpoint.model_kind is ModelKind.ONNX:
            _refuse_onnx(self.model, "attention maps need the PyTorch model's softmax weights, which the ONNX "
                         "graph does not output", config)


class TrainBase(_Spec):
    """Options shared by the jobs that read labeled data."""

    output: str = Field(description="Output prefix (local directory, file:// or s3://).")
    batch_size: int = Field(32, gt=0, le=4096, description="Images per step (per forward pass for evaluate).")
    precision: Precision = Field("auto", description="bf16 on CPUs/GPUs that support it, fp16, or fp32.")
    device: Device = Field("auto", description="auto picks CUDA when the worker has it.")
    seed: int = Field(0, description="Seed for splits, initialization, augmentation and data order.")
    image_column: str | None = Field(
        None, description="Parquet data: the image column; unset = the huggingface Image column, else the only "
        "binary or struct{bytes, path} column.",
    )
    label_column: str | None = Field(
        None, description="Parquet data: the label column (ClassLabel ids get their names from the huggingface "
        "metadata, strings are names); unset = the file's only ClassLabel column.",
    )
    label_key: str = Field(
        "cls", description="Webdataset tars: the sample's field that holds its label: a member (cls: the text of "
        "its .cls member) or a field of its .json member (label, json.label, json.a.b).",
    )
    image_key: str | None = Field(
        None, description="Webdataset tars: the sample's field that holds its image (e.g. jpg); unset = the first "
        "of jpg, jpeg, png, webp, gif, bmp, tif, tiff the sample has.",
    )


class FinetuneSpec(TrainBase):
    """Fine-tune (or train from a config) an image classifier on labeled images."""

    kind: Literal["finetune"] = Field("finetune", description="Job kind: finetune.")
    train: str = Field(description="Labeled images: an ImageFolder prefix (one folder per class), a CSV/JSONL manifest "
                       "(key,label), or parquet files / webdataset tars that carry their labels (a prefix or one object).")
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
        _field_value(refuse_file_keys, value)
        return value

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """A model is made from the PyTorch modules: an ONNX export cannot be fine-tuned."""
        if checkpoint.model_kind is ModelKind.ONNX:
            _refuse_onnx(str(self.model), "fine-tuning starts from a PyTorch model only", config)

    @model_validator(mode="after")
    def _one_start(self):
        if (self.model is None) == (self.config is None):
            raise ValueError("give exactly one of --model (pretrained) or --config (from scratch)")
        return self


class EvaluateSpec(TrainBase):
    """Accuracy, top-5, per-class report and confusion matrix of a model on labeled images."""

    kind: Literal["evaluate"] = Field("evaluate", description="Job kind: evaluate.")
    input: str = Field(description="Labeled images: an ImageFolder prefix, a CSV/JSONL manifest (key,label), or "
                       "parquet files / webdataset tars that carry their labels.")
    model: str = Field(description="hf:, timm:, a local save_pretrained directory, or s3:// directory.")
    batch_size: int = Field(64, gt=0, le=4096, description="Images per forward pass.")

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """Accuracy needs a trained classifier."""
        _needs_classifier(self.model, checkpoint)


class ExportSpec(_Spec):
    """Export a PyTorch model to an ONNX model directory (optionally int8), checked against PyTorch."""

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
        "as a fraction of the sample's largest |logit| (models without a classifier: the cls embedding's, as a "
        "fraction of its largest |value|); the job fails above it.",
    )
    int8_min_agreement: float = Field(
        0.95, ge=0, le=1, description="Least top-1 agreement of the int8 model with PyTorch fp32 on decisive "
        "sample images (top-2 probability margin > 0.05; models without a classifier: the share of images whose "
        "int8 cls embedding has cosine >= 0.99 with PyTorch fp32); the job fails below it.",
    )

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """Export reads the PyTorch modules: an ONNX export is not exported again."""
        if checkpoint.model_kind is ModelKind.ONNX:
            _refuse_onnx(self.model, "export starts from a PyTorch model only", config)


class VectorJob(_Spec):
    """Options of the jobs that read an embed job's vectors instead of images."""

    embeddings: str = Field(description="An embed job's output prefix (its latest succeeded job) or one job's "
                            "folder (<output>/_jobs/<job id>/); only the parts its _SUCCESS.json lists are read.")
    output: str = Field(description="Output prefix (local directory, file:// or s3://).")
    pooling: Pooling = Field("cls", description="Which stored array to compare: cls, pooled or mean (one vector "
                             "per image; patches are refused).")
    lane: Literal["auto", "interactive", "bulk"] = Field(
        "auto", description="Queue lane; auto = interactive for small jobs, bulk otherwise.")

    @field_validator("embeddings", "queries", check_fields=False)
    @classmethod
    def _vectors(cls, value: str | None) -> str | None:
        return _field_value(normalize_uri, value)

    @field_validator("pooling")
    @classmethod
    def _one_vector(cls, value: str) -> str:
        if value == "patches":
            raise ValueError("patches are [tokens, hidden] per image, not one vector: compare cls, pooled or mean")
        return value


class DedupSpec(VectorJob):
    """Semantic deduplication (SemDeDup) of an embed job's vectors: k-means, then pairwise cosine inside each
    cluster and with the nearest other clusters; a row is removed when a kept row before it is >= 1 - eps."""

    kind: Literal["dedup"] = Field("dedup", description="Job kind: dedup.")
    eps: float = Field(0.01, gt=0, lt=1, description="Duplicates have cosine >= 1 - eps with a row kept before them.")
    clusters: int | None = Field(None, gt=0, le=1_000_000, description="k-means clusters; unset = sqrt(vectors), "
                                 "at most 50,000.")
    keep: Literal["hard", "easy", "random"] = Field(
        "hard", description="Which row of a near-duplicate group is kept: hard = farthest from its centroid (NeMo's "
        "default), easy = nearest, random = seeded.")
    sample_fraction: float | None = Field(None, gt=0, le=1, description="Share of the vectors k-means is fitted on "
                                          "(seeded); unset = 64 per cluster, at most all of them.")
    seed: int = Field(0, description="Seed of the k-means sample, its initialization and --keep random.")
    vectors_per_task: int = Field(200_000, gt=0, description="Vectors per pairwise task: clusters are grouped into "
                                  "about vectors / this many tasks.")
    max_cluster_size: int = Field(100_000, ge=100, description="A cluster larger than this is split by a second "
                                  "k-means level before its pairwise step (compute grows with its square).")
    rule: Literal["kept", "semdedup"] = Field(
        "kept", description="kept = a row is removed when a row KEPT before it is >= 1 - eps (its stand-in: no "
        "kept pair above the threshold, every removed row has a kept one above it), and pairs across clusters are "
        "resolved too; semdedup = NeMo Curator's rule: removed when any row before it in its cluster is >= 1 - eps "
        "(a chain A ~ B ~ C loses C), clusters never compared.")
    cross_clusters: int = Field(12, ge=0, le=16, description="rule kept: each row is also compared with the rows of "
                                "the other clusters whose centroid cosine is within 0.125 sqrt(2 eps) of its own "
                                "cluster's, at most this many, nearest first; 0 = inside clusters (and the pieces "
                                "of a split one) only.")


class NeighborsSpec(VectorJob):
    """The k nearest rows of --embeddings by cosine for every row of --queries (exact, or a faiss index above a size)."""

    kind: Literal["neighbors"] = Field("neighbors", description="Job kind: neighbors.")
    queries: str = Field(description="Another embed job's output prefix or job folder: one result row per vector.")
    k: int = Field(10, gt=0, le=1000, description="Neighbours kept per query.")
    mode: Literal["auto", "exact", "approximate"] = Field(
        "auto", description="exact = blocked matrix products (one task per block of queries); approximate = one "
        "faiss IVF-Flat index of --embeddings, built once per job by its first task, searched by one task per block "
        "of queries (its recall@k, measured on a seeded sample, is in _SUCCESS.json); auto = approximate from "
        "20,000 queries and 2,000,000,000 query x vector pairs up (bench/neighbors.py), unless the index would scan "
        "over a sixteenth of its lists to reach --recall-target (vectors without clusters); exact otherwise.")
    queries_per_task: int = Field(20_000, gt=0, description="Query vectors per task.")
    recall_target: float = Field(0.95, gt=0, le=1, description="approximate: the index scans the fewest lists "
                                 "(a power of two) whose recall@k on a seeded sample of queries reaches this.")
    seed: int = Field(0, description="approximate: seed of the index's k-means sample and of the query samples "
                      "its nprobe is tuned and its recall measured on.")


JobSpec = Annotated[
    ClassifySpec | EmbedSpec | AttentionSpec | FinetuneSpec | EvaluateSpec | ExportSpec | DedupSpec | NeighborsSpec,
    Field(discriminator="kind")
]
_ADAPTER = TypeAdapter(JobSpec)
InferenceSpec = ClassifySpec | EmbedSpec | AttentionSpec  # the kinds planned into image shards (planner.plan_job)
# What else differs by kind (its task, unit, queue...) is its record in kinds.py, which tests/unit/test_kinds.py
# holds to this union: a spec here without a registered kind, or the reverse, fails there.


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
