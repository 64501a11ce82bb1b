"""The checkpoints people actually use, as the hub publishes them: backbones, CLIP, SigLIP, MAE.

Each tiny model (tests/helpers_checkpoints.py) is built from the real class, saved with
save_pretrained beside its own image processor, and run through the in-process shard path
(run_local: the real loading code, pipeline and heads) in fp32. References come from the
model's own API: `get_image_features`, `pooler_output`, `last_hidden_state`, `logits_per_image`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_checkpoints import CHECKPOINTS, DUAL
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobspec.checks.models import check_model_options
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelrefs import normalize_model_ref, read_config
from orchestrator.published.results import read_embeddings, read_table
from orchestrator.store.storage import ObjectStore
from workers.context import WorkerContext
from workers.decode.imaging import decode_rgb
from workers.decode.preprocess import resize_image
from workers.errors import ModelLoadError
from workers.inprocess import run_local

N_IMAGES = 6


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Distinct images: colour fields and shapes of several sizes (not all square)."""
    root = tmp_path_factory.mktemp("checkpoint-images")
    rng = np.random.default_rng(3)
    for i in range(N_IMAGES):
        coarse = rng.integers(0, 256, (3 + i % 3, 4, 3), dtype=np.uint8)
        Image.fromarray(coarse).resize((48 + 8 * i, 40), Image.BICUBIC).save(root / f"img{i}.png")
    return root


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    return WorkerContext(Settings())


def spec_for(kind: str, images: Path, model: Path, out: Path, **options):
    return parse_spec({"kind": kind, "input": str(images), "output": str(out), "model": str(model),
                       "device": "cpu", "precision": "fp32", **options})


def pixels_of(images: Path, model_dir: Path, keys: list[str]) -> torch.Tensor:
    """The images as the model's own preprocessing makes them (the job's resize, fp32 normalize)."""
    prep = load_model(normalize_model_ref(str(model_dir)), device="cpu", precision="fp32").prep
    arrays = [resize_image(decode_rgb((images / key).read_bytes()), prep) for key in keys]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (pixels - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)


def reference(name: str, model_dir: Path, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """cls and mean as each model's own API defines its image representation, in fp32."""
    import transformers as tf

    with torch.inference_mode():
        if name == "clip-model":
            model = tf.CLIPModel.from_pretrained(model_dir)
            out = model.vision_model(pixel_values=pixels)
            cls = model.get_image_features(pixel_values=pixels).pooler_output  # projected (transformers 5)
            tokens = model.vision_model.post_layernorm(out.last_hidden_state)[:, 1:]
            return {"cls": cls.numpy(), "mean": tokens.mean(1).numpy(), "pooled": out.pooler_output.numpy()}
        if name == "clip-vision-projection":
            model = tf.CLIPVisionModelWithProjection.from_pretrained(model_dir)
            out = model(pixel_values=pixels)
            tokens = model.vision_model.post_layernorm(out.last_hidden_state)[:, 1:]
            return {"cls": out.image_embeds.numpy(), "mean": tokens.mean(1).numpy()}
        if name == "siglip-model":
            model = tf.SiglipModel.from_pretrained(model_dir)
            out = model.vision_model(pixel_values=pixels)
            cls = model.get_image_features(pixel_values=pixels).pooler_output  # the attention-pool head
            return {"cls": cls.numpy(), "mean": out.last_hidden_state.mean(1).numpy()}
        model = tf.AutoModel.from_pretrained(model_dir, **({"mask_ratio": 0.0} if name == "vit-mae-model" else {}))
        kwargs = {}
        if name == "vit-mae-model":  # every patch in place: the identity permutation as MAE's noise
            n = model.embeddings.patch_embeddings.num_patches
            kwargs["noise"] = torch.arange(n, dtype=torch.float32).expand(len(pixels), n)
        hidden = model(pixel_values=pixels, **kwargs).last_hidden_state
        return {"cls": hidden[:, 0].numpy(), "mean": hidden[:, 1:].mean(1).numpy()}


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_embed_gives_each_models_own_image_embedding(name, checkpoint_dirs, images, tmp_path, ctx):
    model_dir = checkpoint_dirs(name)
    store = ObjectStore(Settings())
    pooling = "cls,mean,pooled" if name in ("clip-model",) else "cls,mean"
    spec = spec_for("embed", images, model_dir, tmp_path / "embed", pooling=pooling)
    run_local(spec, ctx)
    keys, cls = read_embeddings(spec.output, "cls", store)
    _, mean = read_embeddings(spec.output, "mean", store)
    expected = reference(name, model_dir, pixels_of(images, model_dir, keys))
    assert len(keys) == N_IMAGES
    assert cls.shape == expected["cls"].shape
    assert cosines(cls, expected["cls"]).min() >= 0.9999
    assert cosines(mean, expected["mean"]).min() >= 0.9999
    if "pooled" in expected and "pooled" in pooling:
        _, pooled = read_embeddings(spec.output, "pooled", store)
        assert cosines(pooled, expected["pooled"]).min() >= 0.9999


def test_embed_normalize_writes_unit_vectors_that_say_so(checkpoint_dirs, images, tmp_path, ctx):
    import io
    import json

    import pyarrow.parquet as pq

    from orchestrator.published.results import success_record
    from orchestrator.store.storage import join

    store = ObjectStore(Settings())
    spec = spec_for("embed", images, checkpoint_dirs("clip-model"), tmp_path / "embed", pooling="cls,mean",
                    normalize=True)
    run_local(spec, ctx)
    _, cls = read_embeddings(spec.output, "cls", store)
    np.testing.assert_allclose(np.linalg.norm(cls.astype(np.float32), axis=1), 1.0, atol=2e-3)
    record = success_record(spec.output, store)
    index = next(p.name for p in record.parts if p.name.endswith(".parquet"))
    arrays = json.loads(pq.read_table(io.BytesIO(store.read(join(spec.output, index)))).schema.metadata[
        b"vitbatch.arrays"])
    assert arrays["cls"]["normalized"] is True and arrays["cls"]["projected"] is True
    assert arrays["cls"]["source"] == "projected" and arrays["mean"]["source"] == "mean_of_patch_tokens"


def test_mae_embeddings_are_the_same_every_time(checkpoint_dirs, images, tmp_path, ctx):
    """ViTMAEModel masks 75% of the patches at random per call unless told otherwise."""
    store = ObjectStore(Settings())
    vectors = []
    for attempt in range(2):
        spec = spec_for("embed", images, checkpoint_dirs("vit-mae-model"), tmp_path / f"mae{attempt}",
                        pooling="cls,patches")
        run_local(spec, ctx)
        vectors.append(read_embeddings(spec.output, "patches", store)[1])
    assert vectors[0].shape[1] == 64  # every patch of the 8x8 grid, none masked
    np.testing.assert_array_equal(vectors[0], vectors[1])


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_classify_on_a_headless_checkpoint_is_refused_at_submit_with_what_to_do(name, checkpoint_dirs, images,
                                                                                 tmp_path):
    spec = spec_for("classify", images, checkpoint_dirs(name), tmp_path / "out", top_k=1)
    with pytest.raises(SpecError) as refused:
        check_model_options(spec, read_config(spec.model, ObjectStore(Settings())))
    message = str(refused.value)
    assert "random head" in message and "embed" in message and "finetune" in message
    assert ("--labels" in message) == (name in DUAL)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["vit-model", "clip-model"])
def test_classify_on_a_headless_checkpoint_fails_on_the_worker_too(name, checkpoint_dirs, images, tmp_path, ctx):
    """A hub name is checked where it loads: the worker refuses once (not retryable) instead of inventing labels."""
    spec = spec_for("classify", images, checkpoint_dirs(name), tmp_path / "out", top_k=1)
    with pytest.raises(ModelLoadError, match="without a trained classifier"):
        run_local(spec, ctx)


def test_a_classifier_whose_head_weights_are_missing_is_not_a_classifier(checkpoint_dirs, tmp_path):
    """A ViTModel's weights saved under a ForImageClassification config: transformers would init the head."""
    import json
    import shutil

    directory = tmp_path / "mislabelled"
    shutil.copytree(checkpoint_dirs("vit-model"), directory)
    config = json.loads((directory / "config.json").read_text())
    config["architectures"] = ["ViTForImageClassification"]
    (directory / "config.json").write_text(json.dumps(config))
    model = load_model(normalize_model_ref(str(directory)), device="cpu", precision="fp32")
    assert not model.family.has_classifier and model.id2label == {}


@pytest.mark.parametrize("name", DUAL)
def test_zero_shot_top1_is_the_models_own_argmax(name, checkpoint_dirs, images, tmp_path, ctx):
    import transformers as tf

    labels = ["cat", "dog", "car", "red square", "blue circle"]
    model_dir = checkpoint_dirs(name)
    spec = spec_for("classify", images, model_dir, tmp_path / "zs", labels=",".join(labels), top_k=3)
    check_model_options(spec, read_config(spec.model, ObjectStore(Settings())))  # accepted at submit
    run_local(spec, ctx)
    rows = sorted(read_table(spec.output, ObjectStore(Settings())).to_pylist(), key=lambda r: r["key"])
    assert all(r["error"] is None for r in rows) and len(rows) == N_IMAGES

    model = tf.AutoModel.from_pretrained(model_dir)
    tokenizer = tf.AutoTokenizer.from_pretrained(model_dir)
    prompts = [f"a photo of a {label}." for label in labels]
    padding = {"padding": "max_length", "max_length": 16} if name == "siglip-model" else {"padding": True}
    text = tokenizer(prompts, return_tensors="pt", **padding)
    if name == "siglip-model":
        text.pop("attention_mask", None)
    with torch.inference_mode():
        logits = model(pixel_values=pixels_of(images, model_dir, [r["key"] for r in rows]), **text).logits_per_image
    assert [r["label"] for r in rows] == [labels[i] for i in logits.argmax(dim=1).tolist()]
    assert [r["topk_labels"][0] for r in rows] == [r["label"] for r in rows]
    assert all(len(r["topk_labels"]) == 3 for r in rows)


def test_zero_shot_labels_are_refused_for_a_model_without_a_text_tower(checkpoint_dirs, images, tmp_path):
    spec = spec_for("classify", images, checkpoint_dirs("vit-model"), tmp_path / "out", labels="cat,dog", top_k=1)
    with pytest.raises(SpecError, match="image-text model"):
        check_model_options(spec, read_config(spec.model, ObjectStore(Settings())))


def test_zero_shot_labels_from_a_file_and_their_rules(tmp_path):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\n\ndog\ncar\n")
    base = {"kind": "classify", "input": str(tmp_path), "output": str(tmp_path / "o"), "model": str(tmp_path),
            "top_k": 2}
    assert parse_spec({**base, "labels": f"@{labels}"}).labels == ["cat", "dog", "car"]
    for bad, why in (({"labels": "cat,cat"}, "distinct"), ({"labels": "cat,dog", "top_k": 3}, "top_k=3"),
                     ({"labels": "cat,dog", "prompt": "no slot"}, "exactly one"),
                     ({"labels": f"@{tmp_path / 'missing.txt'}"}, "cannot read")):
        with pytest.raises(SpecError, match=why):
            parse_spec({**base, **bad})


def test_attention_maps_for_dual_encoders(checkpoint_dirs, images, tmp_path, ctx):
    """CLIP has a CLS query; SigLIP has none, so its map is the mean over patch queries: both sum to 1."""
    store = ObjectStore(Settings())
    for name in DUAL:
        spec = spec_for("attention", images, checkpoint_dirs(name), tmp_path / name, layers="-1", max_overlays=0)
        run_local(spec, ctx)
        _, maps = read_embeddings(spec.output, "rollout", store)
        assert maps.shape == (N_IMAGES, 8, 8)
        np.testing.assert_allclose(maps.astype(np.float32).sum(axis=(1, 2)), 1.0, atol=5e-3)


def test_timm_clip_projection_is_not_a_classifier(tmp_path, images, ctx):
    """timm's CLIP models end in the 512-d image projection: classify would label 512 fake classes."""
    import timm

    model = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False, img_size=32, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2, num_classes=24)
    timm.models.save_for_hf(model, tmp_path / "clip", safe_serialization=True)
    spec = spec_for("classify", images, tmp_path / "clip", tmp_path / "out", top_k=1)
    with pytest.raises(SpecError, match="image projection"):
        check_model_options(spec, read_config(spec.model, ObjectStore(Settings())))
    embed = spec_for("embed", images, tmp_path / "clip", tmp_path / "emb", pooling="cls,pooled")
    run_local(embed, ctx)
    _, cls = read_embeddings(embed.output, "cls", ObjectStore(Settings()))
    _, pooled = read_embeddings(embed.output, "pooled", ObjectStore(Settings()))
    assert cls.shape == (N_IMAGES, 24) and pooled.shape == (N_IMAGES, 32)  # projected, and the features before it


@pytest.mark.parametrize("name", DUAL)
def test_a_clip_or_siglip_classifier_embeds_what_its_classifier_reads(name, checkpoint_dirs, images, tmp_path, ctx):
    """A linear probe of CLIP/SigLIP (CLIPForImageClassification) keeps its tower as `vision_model` and
    classifies the mean of its final tokens: embed, attention and classify all run on it."""
    import transformers as tf

    source = tf.AutoConfig.from_pretrained(checkpoint_dirs(name))
    classes = {"clip-model": tf.CLIPForImageClassification, "siglip-model": tf.SiglipForImageClassification}
    torch.manual_seed(0)
    model = classes[name](source.__class__(text_config=source.text_config.to_dict(),
                                           vision_config=source.vision_config.to_dict(), num_labels=3))
    model.save_pretrained(tmp_path / "probe")
    tf.AutoImageProcessor.from_pretrained(checkpoint_dirs(name)).save_pretrained(tmp_path / "probe")
    store = ObjectStore(Settings())
    spec = spec_for("embed", images, tmp_path / "probe", tmp_path / "emb", pooling="cls")
    run_local(spec, ctx)
    keys, cls = read_embeddings(spec.output, "cls", store)
    with torch.inference_mode():
        hidden = model.vision_model(pixel_values=pixels_of(images, tmp_path / "probe", keys)).last_hidden_state
    expected = hidden[:, 1:].mean(1) if name == "clip-model" else hidden.mean(1)
    assert cosines(cls, expected.numpy()).min() >= 0.9999
    run_local(spec_for("attention", images, tmp_path / "probe", tmp_path / "attn", max_overlays=0), ctx)
    assert read_embeddings(str(tmp_path / "attn"), "rollout", store)[1].shape == (N_IMAGES, 8, 8)
    run_local(spec_for("classify", images, tmp_path / "probe", tmp_path / "cls", top_k=1), ctx)
    assert len(read_table(str(tmp_path / "cls"), store)) == N_IMAGES
