"""The image jobs' specs: classify, embed and attention run over images, planned into shards of
images (planner.plan_job) that workers/runner.run_shard serves with the kind's head.

Every field has a description: it becomes the `--help` text and the JSON schema (`vitbatch schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.errors import SpecError
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind
from orchestrator.jobspec.specbase import (
    BaseSpec,
    Decode,
    DistinctList,
    Lane,
    OutputPrefix,
    Pooling,
    Precision,
    WorkerDevice,
    checked_unless_unset,
    needs_classifier,
    refuse_onnx,
)


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


class JobBase(BaseSpec):
    """Options every inference job shares."""

    input: str = Field(
        description="Images: a local directory, file:// or s3:// prefix, or a manifest file "
        "(.txt one key per line, .jsonl with a 'key' field); .tar and .parquet objects there are read too."
    )
    output: OutputPrefix
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
    keep_columns: DistinctList[str] = Field(
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
    device: WorkerDevice = "auto"
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
    lane: Lane = Field(
        "auto", description="Queue lane; auto = interactive for small jobs, bulk otherwise (nightly runs use bulk)."
    )


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
        return checked_unless_unset(read_labels, value) if isinstance(value, str) else value

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
            needs_classifier(self.model, checkpoint)
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


def _cls_pooling() -> list[Pooling]:
    return ["cls"]


class EmbedSpec(JobBase):
    """Embeddings of the final normalized hidden state: CLS, mean of patches, or every patch token."""

    kind: Literal["embed"] = Field("embed", description="Job kind: embed.")
    pooling: DistinctList[Pooling] = Field(
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

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """--pooling pooled needs a pooled output apart from `cls` (an ONNX export lists its outputs)."""
        if "pooled" not in self.pooling:
            return
        onnx = checkpoint.model_kind is ModelKind.ONNX
        if onnx and config is not None and "pooled" not in (config.get("outputs") or {}):
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
        refuse_onnx(self.model, "attention maps need the PyTorch model's softmax weights, which the ONNX graph "
                    "does not output", checkpoint, config)


InferenceSpec = ClassifySpec | EmbedSpec | AttentionSpec  # the kinds planned into image shards (planner.plan_job)
