"""Labels from the data itself, for finetune and evaluate: a `datasets` parquet's ClassLabel column (names from
its huggingface metadata), a string --label-column, and webdataset tars with .cls or .json members beside
each image. A tiny ViT fine-tuned on the parquet is evaluated on the tar, per class, under the dataset's names."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from parquet_datasets import N, hf_dataset, png

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.inputs.labeledsources import LabelOptions
from orchestrator.inputs.labels import load_labeled
from orchestrator.jobspec.modelspecs import EvaluateSpec, FinetuneSpec
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.decode.labeledcells import ContainerReader
from workers.training.evaluation import evaluate
from workers.training.finetune import finetune

TINY_VIT = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64}
NAMES = ["ant", "bee", "cow"]


def webdataset_tar(path: Path, label_member: str) -> Path:
    """Samples `s0000.png` + `s0000.cls` (the class name) or `s0000.json` ({"label": name}), as webdataset writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as archive:
        for i in range(N):
            label = NAMES[i % 3]
            extra = label.encode() if label_member == "cls" else json.dumps({"label": label, "i": i}).encode()
            for name, data in ((f"s{i:04d}.png", png(i)), (f"s{i:04d}.{label_member}", extra)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def test_a_classlabel_column_gives_its_names_and_rows_keep_file_order(tmp_path):
    items = load_labeled(normalize_uri(str(hf_dataset(tmp_path / "ds"))), ObjectStore(Settings()))
    assert [item.key for item in items] == [f"train.parquet/{i}" for i in range(N)]  # row order, not "1" < "10" < "2"
    assert [item.label for item in items] == [NAMES[i % 3] for i in range(N)]


def test_a_string_label_column_and_a_tar_with_json_or_cls_members(tmp_path):
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"jpg": [png(i) for i in range(N)], "species": [NAMES[i % 3] for i in range(N)]}),
                   tmp_path / "p" / "x.parquet")
    store = ObjectStore(Settings())
    by_column = load_labeled(normalize_uri(str(tmp_path / "p")), store, LabelOptions(label_column="species"))
    assert [i.label for i in by_column] == [NAMES[i % 3] for i in range(N)]
    with pytest.raises(SpecError, match="--label-column"):
        load_labeled(normalize_uri(str(tmp_path / "p")), store)
    cls = load_labeled(normalize_uri(str(webdataset_tar(tmp_path / "t" / "a.tar", "cls"))), store)
    as_json = load_labeled(normalize_uri(str(webdataset_tar(tmp_path / "j" / "a.tar", "json"))), store,
                           LabelOptions(label_key="label"))
    assert [i.label for i in cls] == [i.label for i in as_json] == [NAMES[i % 3] for i in range(N)]
    assert cls[0].key == "a.tar/s0000"  # webdataset's sample key
    with pytest.raises(SpecError, match="no .cls member"):
        load_labeled(normalize_uri(str(tmp_path / "j" / "a.tar")), store)
    reader = ContainerReader(store, Settings())
    assert reader.read(cls[5].uri) == png(5) and reader.read(by_column[7].uri) == png(7)


def test_finetune_on_a_parquet_dataset_and_evaluate_on_a_tar_under_the_dataset_names(tmp_path, ctx):
    torch.set_num_threads(1)
    train = hf_dataset(tmp_path / "ds")
    spec = FinetuneSpec(train=str(train), output=str(tmp_path / "model"), config=TINY_VIT, epochs=1, lr=1e-3,
                        batch_size=4, augment="none", val_split=0.25, device="cpu", precision="fp32")
    result = finetune(spec, "job-parquet", ctx, lambda _: None)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert sorted(config["id2label"].values()) == NAMES and result.errors == 0
    tar = webdataset_tar(tmp_path / "test" / "shard-000.tar", "json")
    metrics_spec = EvaluateSpec(input=str(tmp_path / "test"), model=str(tmp_path / "model"), output=str(tmp_path / "e"),
                                label_key="label", device="cpu", precision="fp32")
    evaluate(metrics_spec, "job-eval", ctx, lambda _: None)
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["n_images"] == N and metrics["n_errors"] == 0 and tar.exists()
    assert set(metrics["per_class"]) <= set(NAMES) and sum(v["support"] for v in metrics["per_class"].values()) == N
    predictions = pq.read_table(tmp_path / "e" / "predictions.parquet").to_pylist()
    assert [r["key"] for r in predictions][:2] == ["shard-000.tar/s0000", "shard-000.tar/s0001"]
    assert {r["label"] for r in predictions} == set(NAMES)
