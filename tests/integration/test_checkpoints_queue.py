"""Hub-class checkpoints through the whole stack: CLI -> Redis -> a real worker -> S3-compatible server.

What users hit last round: classify on a `ViTModel` published random labels, and embed on a
`CLIPModel` failed on the worker three times. Here classify on a backbone is refused by
`vitbatch submit` before anything is written; CLIP embeddings and zero-shot classify run on a
worker that downloads the model (tokenizer included) from s3://.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_checkpoints import build_checkpoint

from orchestrator.published.results import read_embeddings, read_table
from orchestrator.stack.demo import write_digits
from orchestrator.store.storage import ObjectStore

pytestmark = pytest.mark.integration
N_IMAGES = 12


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory, upload, bucket):
    local = tmp_path_factory.mktemp("digits-ckpt")
    write_digits(local, limit=N_IMAGES)
    upload(local, bucket, "inputs/ckpt-digits")
    models = tmp_path_factory.mktemp("hub-classes")
    for name in ("vit-model", "clip-model"):
        upload(build_checkpoint(name, models / name), bucket, f"models/{name}")
    return local, models


@pytest.fixture(scope="module")
def worker(workers):
    workers.start("ckpt-w1")
    return workers


def test_submit_refuses_classify_on_a_backbone_before_writing_anything(uploaded, cli, bucket, settings):
    out = f"s3://{bucket}/out/ckpt-refused/"
    refused = cli(["submit", "classify", "--input", f"s3://{bucket}/inputs/ckpt-digits/", "--output", out,
                   "--model", f"s3://{bucket}/models/vit-model/", "--top-k", "1"])
    assert refused.returncode == 2
    assert "random head" in refused.stderr and "embed" in refused.stderr
    assert list(ObjectStore(settings).list(out)) == []


def test_clip_embed_and_zero_shot_through_the_queue(uploaded, worker, cli, bucket, settings):
    import transformers as tf

    store = ObjectStore(settings)
    images = f"s3://{bucket}/inputs/ckpt-digits/"
    model = f"s3://{bucket}/models/clip-model/"
    emb = f"s3://{bucket}/out/clip-emb/"
    submitted = cli(["submit", "embed", "--input", images, "--output", emb, "--model", model,
                     "--pooling", "cls,pooled", "--normalize", "--shard-size", "6", "--precision", "fp32"])
    assert submitted.returncode == 0, submitted.stderr
    waited = cli(["wait", submitted.stdout.strip().splitlines()[-1]])
    assert waited.returncode == 0, waited.stderr
    keys, cls = read_embeddings(emb, "cls", store)
    assert cls.shape == (N_IMAGES, 24)  # the projected embedding, not the 32-d hidden state
    np.testing.assert_allclose(np.linalg.norm(cls.astype(np.float32), axis=1), 1.0, atol=2e-3)

    labels = ["zero", "one", "two", "three"]
    zs = f"s3://{bucket}/out/clip-zero-shot/"
    submitted = cli(["submit", "classify", "--input", images, "--output", zs, "--model", model,
                     "--labels", ",".join(labels), "--prompt", "a photo of the digit {}", "--top-k", "2", "--precision", "fp32"])
    assert submitted.returncode == 0, submitted.stderr
    waited = cli(["wait", submitted.stdout.strip().splitlines()[-1]])
    assert waited.returncode == 0, waited.stderr
    rows = {r["key"]: r for r in read_table(zs, store).to_pylist()}
    assert set(rows) == set(keys) and all(r["error"] is None for r in rows.values())

    local_images, models = uploaded
    from workers.decode.imaging import decode_rgb
    from workers.decode.preprocess import resize_image
    from workers.models import hf_preprocess

    reference = tf.CLIPModel.from_pretrained(models / "clip-model")
    tokenizer = tf.AutoTokenizer.from_pretrained(models / "clip-model")
    prep = hf_preprocess(tf.AutoImageProcessor.from_pretrained(models / "clip-model"))
    order = sorted(rows)  # the job's own decode and resize, fp32 normalize: the same pixels the worker saw
    arrays = [resize_image(decode_rgb((local_images / key).read_bytes()), prep) for key in order]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)
    text = tokenizer([f"a photo of the digit {label}" for label in labels], return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = reference(pixel_values=pixels, **text).logits_per_image
    assert [rows[key]["label"] for key in order] == [labels[i] for i in logits.argmax(dim=1).tolist()]
