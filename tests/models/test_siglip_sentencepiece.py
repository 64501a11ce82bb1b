"""SigLIP as google/siglip-* publish it: a sentencepiece tokenizer (spiece.model, SiglipTokenizer) beside the
weights. A tiny one, its tokenizer trained with sentencepiece on a few lines, runs zero-shot classify through
vitbatch as transformers scores it; a worker without sentencepiece says what to install instead of raising
an ImportError."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_checkpoints import SIZE, TEXT, VISION
from PIL import Image

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_table
from orchestrator.store.storage import ObjectStore
from workers.context import WorkerContext
from workers.inprocess import run_local
from workers.models import load

LINES = ["a photo of a cat", "a photo of a dog", "a red car", "a blue bird", "the green square", "a circle of noise"]
LABELS = ["cat", "dog", "car"]


def build_siglip(directory: Path) -> Path:
    """SiglipModel + SiglipImageProcessor + a SiglipTokenizer over a sentencepiece model trained here."""
    import sentencepiece as spm
    import transformers as tf

    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory.parent / "corpus.txt"
    corpus.write_text("\n".join(LINES * 20))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(directory.parent / "spiece"), vocab_size=40,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    tokenizer = tf.SiglipTokenizer(vocab_file=str(directory.parent / "spiece.model"),
                                   model_max_length=TEXT["max_position_embeddings"])
    tokenizer.save_pretrained(directory)
    torch.manual_seed(0)
    text = tf.SiglipTextConfig(**TEXT, vocab_size=len(tokenizer), projection_size=32)
    config = tf.SiglipConfig(text_config=text.to_dict(), vision_config=tf.SiglipVisionConfig(**VISION).to_dict())
    tf.SiglipModel(config).save_pretrained(directory)
    tf.SiglipImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def siglip(tmp_path_factory) -> Path:
    return build_siglip(tmp_path_factory.mktemp("siglip") / "model")


def test_a_siglip_with_a_sentencepiece_tokenizer_classifies_zero_shot_as_transformers_scores_it(siglip, tmp_path):
    import transformers as tf

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{i}.png")
    loaded = load(str(siglip), "cpu", "fp32", settings=Settings(), store=ObjectStore(Settings()))
    assert type(loaded.family.tokenizer).__name__ == "SiglipTokenizer"
    spec = parse_spec({"kind": "classify", "input": str(tmp_path / "images"), "output": str(tmp_path / "o"),
                       "model": str(siglip), "device": "cpu", "precision": "fp32", "labels": ",".join(LABELS),
                       "top_k": 3})
    run_local(spec, WorkerContext(Settings()))
    rows = sorted(read_table(spec.output).to_pylist(), key=lambda r: r["key"])
    assert [r["error"] for r in rows] == [None] * 4
    model, tokenizer = tf.SiglipModel.from_pretrained(siglip), tf.AutoTokenizer.from_pretrained(siglip)
    processor = tf.SiglipImageProcessor.from_pretrained(siglip)
    pixels = processor([Image.open(tmp_path / "images" / r["key"]) for r in rows], return_tensors="pt")
    text = tokenizer([f"a photo of a {label}." for label in LABELS], padding="max_length", max_length=16, truncation=True,
                     return_tensors="pt")
    with torch.inference_mode():
        logits = model(pixel_values=pixels["pixel_values"], input_ids=text["input_ids"]).logits_per_image
    assert [r["label"] for r in rows] == [LABELS[i] for i in logits.argmax(dim=1).tolist()]


def test_a_worker_without_sentencepiece_refuses_the_model_with_what_to_install(siglip):
    """sentencepiece hidden from the interpreter before transformers looks for it (sys.modules[name] = None)."""
    script = (
        "import sys; sys.modules['sentencepiece'] = None\n"
        "from orchestrator.config import Settings\nfrom orchestrator.store.storage import ObjectStore\n"
        "from workers.errors import ModelLoadError\nfrom workers.models import load\n"
        "try:\n"
        f"    load({str(siglip)!r}, 'cpu', 'fp32', settings=Settings(), store=ObjectStore(Settings()))\n"
        "except ModelLoadError as e:\n    print('REFUSED:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "REFUSED:" in done.stdout and "sentencepiece" in done.stdout and "vitbatch[worker]" in done.stdout
