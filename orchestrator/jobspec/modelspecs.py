"""The model jobs' specs: finetune makes a model, evaluate measures one on labeled images and export
converts one to ONNX; each runs as one task (the kind's unit is `single`).

Every field has a description: it becomes the `--help` text and the JSON schema (`vitbatch schema`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from orchestrator.jobspec.modelkinds import Checkpoint
from orchestrator.jobspec.modelrefs import refuse_file_keys
from orchestrator.jobspec.specbase import (
    BaseSpec,
    Device,
    OutputPrefix,
    Precision,
    WorkerDevice,
    checked_unless_unset,
    needs_classifier,
    refuse_onnx,
)


class TrainBase(BaseSpec):
    """Options shared by the jobs that read labeled data."""

    output: OutputPrefix
    batch_size: int = Field(32, gt=0, le=4096, description="Images per step (per forward pass for evaluate).")
    precision: Precision = Field("auto", description="bf16 on CPUs/GPUs that support it, fp16, or fp32.")
    device: WorkerDevice = "auto"
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
    train: str = Field(description="Labeled images: an ImageFolder prefix (one folder per class), a CSV/JSONL "
                       "manifest (key,label), or parquet files / webdataset tars that carry their labels (a prefix "
                       "or one object).")
    val: str | None = Field(None, description="Labeled validation images (same layouts); unset = --val-split of "
                            "train.")
    val_split: float = Field(0.1, ge=0.0, lt=0.9, description="Stratified, seeded share of train used for "
                             "validation when --val is unset.")
    model: str | None = Field(None, description="Pretrained starting point (hf:, timm:, local or s3:// dir); or use "
                              "--config.")
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
        "basic", description="none; basic = random resized crop + flip; randaugment = timm rand-m9-mstd0.5-inc1 + "
        "random erasing.",
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
        checked_unless_unset(refuse_file_keys, value)
        return value

    def check_checkpoint(self, checkpoint: Checkpoint, config: dict | None = None) -> None:
        """A model is made from the PyTorch modules: an ONNX export cannot be fine-tuned."""
        refuse_onnx(str(self.model), "fine-tuning starts from a PyTorch model only", checkpoint, config)

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
        needs_classifier(self.model, checkpoint)


class ExportSpec(BaseSpec):
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
        refuse_onnx(self.model, "export starts from a PyTorch model only", checkpoint, config)


ModelJobSpec = FinetuneSpec | EvaluateSpec | ExportSpec  # the kinds whose one task is the whole job
