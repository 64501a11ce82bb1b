"""embed and attention jobs in-process: plan -> manifests -> run_shard -> results readers, on the CPU.

Tiny models of both families, on a square 32x32 input (8x8 patch grid) and a wide 32x48
input (8x12 grid, so a swapped height and width shows up). The timm ones are ViT-Tiny cut
to 2 blocks (saved with their model_args) to keep the file fast on two cores; the bf16
check also runs the 12-block ViT-Tiny of helpers_models, where rounding has more layers
to accumulate over.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_models import LABELS, TIMM_CROP_PCT, TIMM_MEAN, TIMM_STD, load_model
from PIL import Image
from support import build_tiny_vit

from orchestrator.config import Settings
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.jobspec.modelkinds import ModelKind
from orchestrator.jobspec.modelrefs import normalize_model_ref
from orchestrator.published.results import committed_parts, read_arrays, read_embeddings, read_index, success_record
from orchestrator.store.storage import ObjectStore, join
from workers.attention import rollout
from workers.context import WorkerContext
from workers.decode.imaging import decode_rgb
from workers.decode.preprocess import resize_image
from workers.errors import ModelLoadError
from workers.inprocess import run_local

EMPTY = "c-empty.jpg"


class Expect:
    """What a tiny model is: patch grid, hidden size, layers, heads."""

    def __init__(self, grid: tuple[int, int], hidden: int, layers: int, heads: int) -> None:
        self.grid, self.hidden, self.layers, self.heads = grid, hidden, layers, heads

    @property
    def n_patches(self) -> int:
        return self.grid[0] * self.grid[1]


EXPECT = {
    "hf": Expect((8, 8), 32, 2, 2),
    "timm": Expect((8, 8), 48, 2, 3),
    "hf-wide": Expect((8, 12), 32, 2, 2),
    "timm-wide": Expect((8, 12), 48, 2, 3),
}


def build_wide_hf(directory: Path) -> Path:
    """An HF ViT on 32x48 (height x width) inputs: transformers takes image_size as a pair."""
    return build_tiny_vit(directory, image_size=(32, 48), seed=3, labels=[f"LABEL_{i}" for i in range(3)],
                          hidden_size=32, layers=2, heads=2)


def build_small_timm(directory: Path, img_size: tuple[int, int], seed: int) -> Path:
    """ViT-Tiny with 2 blocks of width 48, and helpers_models' non-default preprocessing (crop_pct < 1)."""
    import timm

    torch.manual_seed(seed)
    args = {"img_size": img_size, "patch_size": 4, "embed_dim": 48, "depth": 2, "num_heads": 3, "num_classes": 5}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **args, pretrained_cfg_overlay={
        "mean": TIMM_MEAN, "std": TIMM_STD, "crop_pct": TIMM_CROP_PCT, "interpolation": "bilinear"})
    timm.models.save_for_hf(model, directory, model_config={"label_names": LABELS}, model_args=args,
                            safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def model_dirs(hf_model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"hf": hf_model_dir, "timm": build_small_timm(root / "timm", (32, 32), seed=0),
            "hf-wide": build_wide_hf(root / "hf-wide"), "timm-wide": build_small_timm(root / "timm-wide", (32, 48), seed=1)}


def picture(index: int, width: int, height: int) -> Image.Image:
    """A different colour pattern per index, so every image gets its own embedding."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 256, 3)
    rgb = (base + np.stack([x * (index + 2), y * (9 - index), (x * y) // (index + 1)], -1)) % 256
    return Image.fromarray(rgb.astype(np.uint8))


def encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt, **({"quality": 92} if fmt == "JPEG" else {}))
    return buffer.getvalue()


# Square, tall, wide, grey, RGBA, a 60x40 JPEG and a large JPEG (draft-decoded, thumbnailed).
IMAGES = {
    "a-square.png": lambda: encode(picture(0, 32, 32), "PNG"),
    "b-wide.jpg": lambda: encode(picture(1, 60, 40), "JPEG"),
    EMPTY: lambda: b"",
    "d-tall.png": lambda: encode(picture(2, 40, 60), "PNG"),
    "e-grey.png": lambda: encode(picture(3, 50, 50).convert("L"), "PNG"),
    "f-alpha.png": lambda: encode(picture(4, 48, 32).convert("RGBA"), "PNG"),
    "g-odd.jpg": lambda: encode(picture(5, 33, 47), "JPEG"),
    "h-large.jpg": lambda: encode(picture(6, 1200, 800), "JPEG"),
}
GOOD = [key for key in IMAGES if key != EMPTY]


def write_images(folder: Path, names: list[str] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names or IMAGES:
        (folder / name).write_bytes(IMAGES[name]())
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def ctx() -> WorkerContext:
    """One worker's context for the module: its model cache is shared like a real worker's."""
    return WorkerContext(Settings())


def run_job(ctx: WorkerContext, output: Path, kind: str, input_dir: Path, model_dir: Path, **options) -> str:
    """What submit + the workers do, in-process: plan, write manifests, run every shard, publish."""
    spec = parse_spec({"kind": kind, "input": str(input_dir), "output": str(output), "model": str(model_dir),
                       "device": "cpu", "shard_size": 4, "batch_size": 3, "read_concurrency": 2, **options})
    run_local(spec, ctx)
    return spec.output


@pytest.fixture(scope="module", params=list(EXPECT))
def embed_job(request, ctx, inputs, model_dirs, tmp_path_factory) -> tuple[str, str]:
    name = request.param
    out = run_job(ctx, tmp_path_factory.mktemp(f"embed-{name}"), "embed", inputs, model_dirs[name],
                  pooling="cls,mean,patches", precision="fp32")
    return name, out


@pytest.fixture(scope="module", params=list(EXPECT))
def attention_job(request, ctx, inputs, model_dirs, tmp_path_factory) -> tuple[str, str]:
    name = request.param
    out = run_job(ctx, tmp_path_factory.mktemp(f"attention-{name}"), "attention", inputs, model_dirs[name],
                  layers="0,-1", heads="mean", rollout=True, precision="fp32")
    return name, out


# -- reference computations, straight from transformers and timm ------------------------------------

def reference_pixels(model_dir: Path, keys: list[str], input_dir: Path) -> torch.Tensor:
    """The pixels vitbatch feeds the model (its decode + resize), normalized in fp32."""
    prep = load_model(str(model_dir), device="cpu").prep
    arrays = []
    for key in keys:
        img = decode_rgb((input_dir / key).read_bytes())  # full scale, as jobs decode by default
        arrays.append(resize_image(img, prep))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return (pixels - torch.tensor(prep.mean).view(1, 3, 1, 1)) / torch.tensor(prep.std).view(1, 3, 1, 1)


def reference_embeddings(name: str, model_dir: Path, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        if name.startswith("hf"):
            from transformers import ViTForImageClassification

            module = ViTForImageClassification.from_pretrained(model_dir).eval()
            tokens = module.vit(pixel_values=pixels).last_hidden_state
            cls, prefix = tokens[:, 0], 1
        else:
            import timm

            module = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
            tokens = module.forward_features(pixels)
            cls, prefix = module.forward_head(tokens, pre_logits=True), module.num_prefix_tokens
    return {"cls": cls.numpy(), "mean": tokens[:, prefix:].mean(dim=1).numpy(), "patches": tokens[:, prefix:].numpy()}


def reference_attentions(name: str, model_dir: Path, pixels: torch.Tensor) -> list[np.ndarray]:
    """Post-softmax attention per layer, [B, heads, T, T]: HF's own output_attentions (eager),
    or timm's AttentionExtract over the softmax nodes of the fx graph (not vitbatch's hooks)."""
    with torch.no_grad():
        if name.startswith("hf"):
            from transformers import ViTForImageClassification

            module = ViTForImageClassification.from_pretrained(model_dir, attn_implementation="eager").eval()
            return [a.numpy() for a in module.vit(pixel_values=pixels, output_attentions=True).attentions]
        import timm
        from timm.utils import AttentionExtract

        module = timm.create_model(f"local-dir:{model_dir}", pretrained=True).eval()
        for block in module.blocks:
            block.attn.fused_attn = False
        maps = AttentionExtract(module, method="fx")(pixels)
        return [maps[f"blocks.{i}.attn.softmax"].numpy() for i in range(len(module.blocks))]


def cls_map(attention: np.ndarray, prefix: int = 1) -> np.ndarray:
    """[B, heads, T, T] -> the CLS row's patch columns, renormalized: [B, heads, patches]."""
    row = attention[:, :, 0, prefix:]
    return row / row.sum(axis=-1, keepdims=True)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64).reshape(len(a), -1), b.astype(np.float64).reshape(len(b), -1)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


# -- embed --------------------------------------------------------------------------------------------

def test_embed_stores_cls_mean_and_patches_as_float16_in_manifest_order(embed_job):
    name, out = embed_job
    expect = EXPECT[name]
    shapes = {"cls": (len(GOOD), expect.hidden), "mean": (len(GOOD), expect.hidden),
              "patches": (len(GOOD), expect.n_patches, expect.hidden)}
    for pooling, shape in shapes.items():
        keys, array = read_embeddings(out, pooling)
        assert keys == GOOD
        assert array.dtype == np.float16 and array.shape == shape, (pooling, array.shape)
        assert np.isfinite(array).all()
    _, cls = read_embeddings(out, "cls")
    assert len({row.tobytes() for row in cls}) == len(GOOD)  # every image got its own embedding


def test_embeddings_equal_a_direct_fp32_forward_pass_on_the_same_pixels(embed_job, model_dirs, inputs):
    name, out = embed_job
    reference = reference_embeddings(name, model_dirs[name], reference_pixels(model_dirs[name], GOOD, inputs))
    for pooling in ("cls", "mean", "patches"):
        _, stored = read_embeddings(out, pooling)
        if pooling == "patches":
            cosines = cosine_rows(stored.reshape(-1, stored.shape[-1]), reference[pooling].reshape(-1, stored.shape[-1]))
        else:
            cosines = cosine_rows(stored, reference[pooling])
        assert cosines.min() >= 0.999, (name, pooling, cosines.min())


# bf16 runs under CPU autocast over fp32 weights; fp16 autocast is CUDA-only here.
@pytest.mark.parametrize("name", ["hf", "timm", "timm-12-blocks"])
def test_bf16_embeddings_stay_within_cosine_0_999_of_fp32(name, ctx, inputs, model_dirs, timm_model_dir, tmp_path):
    if name == "timm-12-blocks":  # bf16 is emulated on CPUs without AVX512-BF16: three images suffice
        model_dir, good = timm_model_dir, ["a-square.png", "b-wide.jpg", "d-tall.png"]
        inputs = write_images(tmp_path / "in", good)
    else:
        model_dir, good = model_dirs[name], GOOD
    out = run_job(ctx, tmp_path / "out", "embed", inputs, model_dir, pooling="cls,mean", precision="bf16")
    reference = reference_embeddings(name, model_dir, reference_pixels(model_dir, good, inputs))
    for pooling in ("cls", "mean"):
        keys, stored = read_embeddings(out, pooling)
        assert keys == good
        cosines = cosine_rows(stored, reference[pooling])
        assert cosines.min() >= 0.999, (name, pooling, cosines.min())


def test_an_empty_file_is_an_error_row_with_no_array_row(embed_job, inputs):
    name, out = embed_job
    index = {row["key"]: row for row in read_index(out).to_pylist()}
    assert set(index) == set(IMAGES)
    assert "0 bytes" in index[EMPTY]["error"] and index[EMPTY]["row"] == -1
    keys, cls = read_embeddings(out, "cls")
    assert EMPTY not in keys and len(cls) == len(GOOD)
    for key in GOOD:
        assert index[key]["error"] is None and index[key]["row"] >= 0
    # (shard, row) addresses each good key's array row exactly once
    assert len({(index[k]["shard"], index[k]["row"]) for k in GOOD}) == len(GOOD)


def test_each_index_row_addresses_its_own_vector_in_its_shards_npy(embed_job):
    _, out = embed_job
    keys, cls = read_embeddings(out, "cls")
    store = ObjectStore(Settings())
    for row in (r for r in read_index(out).to_pylist() if r["error"] is None):
        folder = join(out, success_record(out, store).job_dir)
        part = np.load(io.BytesIO(store.read(join(folder, "cls", f"part-{row['shard']:05d}.npy"))))
        assert np.array_equal(part[row["row"]], cls[keys.index(row["key"])])


# -- attention ----------------------------------------------------------------------------------------

def test_attention_stores_head_mean_layer_maps_and_rollout_on_the_patch_grid(attention_job):
    name, out = attention_job
    expect = EXPECT[name]
    names = ["layer0", f"layer{expect.layers - 1}", "rollout"]
    for array_name in names:
        keys, maps = read_arrays(out, array_name)
        assert keys == GOOD
        assert maps.dtype == np.float16 and maps.shape == (len(GOOD), *expect.grid), (array_name, maps.shape)
        assert (maps >= 0).all()
        # float16 storage: 64-96 cells each rounded to ~1e-3 relative
        np.testing.assert_allclose(maps.astype(np.float64).sum(axis=(1, 2)), 1.0, atol=5e-3)


def test_layer_maps_and_rollout_equal_the_models_own_attention(attention_job, model_dirs, inputs):
    name, out = attention_job
    expect = EXPECT[name]
    pixels = reference_pixels(model_dirs[name], GOOD, inputs)
    attentions = reference_attentions(name, model_dirs[name], pixels)
    assert len(attentions) == expect.layers
    for layer in (0, expect.layers - 1):
        want = cls_map(attentions[layer]).mean(axis=1).reshape(-1, *expect.grid)
        _, got = read_arrays(out, f"layer{layer}")
        np.testing.assert_allclose(got.astype(np.float64), want, atol=1e-2, rtol=0)
        assert np.abs(got - want).max() < 0.1 * want.max()  # and not just because every value is tiny
    # Abnar & Zuidema: per layer (head-mean + I) / 2, product from the first layer to the last.
    joint = np.eye(attentions[0].shape[-1])
    for attention in attentions:
        a = attention.astype(np.float64).mean(axis=1) + np.eye(attention.shape[-1])
        joint = (a / a.sum(axis=-1, keepdims=True)) @ joint
    want = cls_map(joint[:, None])[:, 0].reshape(-1, *expect.grid)
    _, got = read_arrays(out, "rollout")
    np.testing.assert_allclose(got.astype(np.float64), want, atol=1e-2, rtol=0)


def test_heads_all_keeps_one_map_per_head(ctx, inputs, model_dirs, tmp_path):
    for name in ("hf", "timm-wide"):
        expect = EXPECT[name]
        out = run_job(ctx, tmp_path / name, "attention", inputs, model_dirs[name], layers="-1", heads="all",
                      rollout=False, max_overlays=0)
        keys, maps = read_arrays(out, f"layer{expect.layers - 1}")
        assert keys == GOOD
        assert maps.dtype == np.float16 and maps.shape == (len(GOOD), expect.heads, *expect.grid)
        np.testing.assert_allclose(maps.astype(np.float64).sum(axis=(2, 3)), 1.0, atol=5e-3)
        _, mean = read_arrays(run_job(ctx, tmp_path / f"{name}-mean", "attention", inputs, model_dirs[name],
                                      layers="-1", rollout=False, max_overlays=0), f"layer{expect.layers - 1}")
        np.testing.assert_allclose(maps.astype(np.float64).mean(axis=1), mean, atol=2e-3)
        stored = {uri.rsplit("/", 2)[1] for uri in committed_parts(out, ObjectStore(Settings()), ".npy")}
        assert stored == {f"layer{expect.layers - 1}"}  # no rollout, no overlays
        assert not committed_parts(out, ObjectStore(Settings()), ".png")


def test_a_layer_the_model_does_not_have_is_refused(ctx, inputs, model_dirs, tmp_path):
    """A 2-layer model has layers 0, 1 (or -1, -2): layer 2 must not wrap around to layer 0."""
    with pytest.raises(ModelLoadError, match="layer"):
        run_job(ctx, tmp_path / "out", "attention", inputs, model_dirs["hf"], layers="2")
    with pytest.raises(ModelLoadError, match="layer"):
        run_job(ctx, tmp_path / "out2", "attention", inputs, model_dirs["hf"], layers="-3")


def test_timm_shards_leave_no_attention_hooks_on_the_cached_model(inputs, model_dirs, tmp_path):
    """Every shard's head taps the worker's one cached module: taps must not pile up, each
    holding on to every attention map computed after its shard ended."""
    ctx = WorkerContext(Settings())
    out = run_job(ctx, tmp_path / "out", "attention", inputs, model_dirs["timm"], max_overlays=0)
    assert len(read_index(out)) == len(IMAGES)  # three shards ran on one cached model
    loaded = ctx.models.get(normalize_model_ref(str(model_dirs["timm"])), "cpu", "auto", attn="eager")
    assert loaded.family.model_kind is ModelKind.TIMM and len(loaded.module.blocks) == EXPECT["timm"].layers
    assert all(not block.attn.attn_drop._forward_hooks for block in loaded.module.blocks)


# -- rollout, the function -----------------------------------------------------------------------------

def test_rollout_of_identity_attention_is_the_identity():
    eye = torch.eye(5).expand(2, 3, 5, 5)
    np.testing.assert_allclose(rollout([eye, eye, eye]).numpy(), torch.eye(5).expand(2, 5, 5).numpy())


def test_rollout_rows_sum_to_one_and_later_layers_multiply_on_the_left():
    torch.manual_seed(0)
    layers = [torch.randn(2, 4, 6, 6).softmax(dim=-1) for _ in range(3)]
    result = rollout(layers)
    np.testing.assert_allclose(result.sum(dim=-1).numpy(), 1.0, atol=1e-5)
    steps = [(a.mean(dim=1) + torch.eye(6)) / 2 for a in layers]
    np.testing.assert_allclose(result.numpy(), (steps[2] @ steps[1] @ steps[0]).numpy(), atol=1e-5)
    assert not torch.allclose(result, steps[0] @ steps[1] @ steps[2], atol=1e-4)  # the order is tested


# -- overlays ----------------------------------------------------------------------------------------

def test_every_good_image_gets_an_overlay_png_at_its_own_aspect_ratio(attention_job, inputs):
    name, out = attention_job
    store = ObjectStore(Settings())
    index = {row["key"]: row for row in read_index(out).to_pylist()}
    assert index[EMPTY]["overlay"] is None
    for key in GOOD:
        overlay = Image.open(io.BytesIO(store.read(join(out, index[key]["overlay"]))))
        assert overlay.format == "PNG"
        overlay.load()
        width, height = Image.open(inputs / key).size
        assert abs(overlay.width * height / width - overlay.height) <= 1, (key, overlay.size, (width, height))
        assert max(overlay.size) <= 512
        if key != "h-large.jpg":  # small images are drawn over at their own size
            assert overlay.size == (width, height)
    wide = Image.open(io.BytesIO(store.read(join(out, index["b-wide.jpg"]["overlay"])))).convert("RGB")
    assert wide.size == (60, 40)
    original = np.asarray(Image.open(inputs / "b-wide.jpg").convert("RGB"), dtype=np.int16)
    changed = np.abs(np.asarray(wide, dtype=np.int16) - original).max(axis=-1)
    assert changed.max() > 20  # the heat really is drawn
    assert (changed == 0).any()  # and the coldest cell leaves the image as it was


def test_max_overlays_writes_only_the_first_n_images_of_the_job(ctx, model_dirs, tmp_path):
    folder = write_images(tmp_path / "in", ["a-square.png", "b-wide.jpg", "d-tall.png", "e-grey.png", "g-odd.jpg"])
    out = run_job(ctx, tmp_path / "out", "attention", folder, model_dirs["hf"], max_overlays=2, shard_size=5)
    rows = read_index(out).to_pylist()
    assert [row["overlay"] is not None for row in rows] == [True, True, False, False, False]
    assert committed_parts(out, ObjectStore(Settings()), ".png") == sorted(join(out, row["overlay"]) for row in rows[:2])
    job_folder = join(out, success_record(out, ObjectStore(Settings())).job_dir)
    assert len(list(ObjectStore(Settings()).list(join(job_folder, "overlays")))) == 2

    # Across shards the count is per job: 4 overlays over shards of 3 = 3 + 1.
    out = run_job(ctx, tmp_path / "out2", "attention", folder, model_dirs["hf"], max_overlays=4, shard_size=3)
    rows = read_index(out).to_pylist()
    assert [row["overlay"] is not None for row in rows] == [True, True, True, True, False]
    assert len(committed_parts(out, ObjectStore(Settings()), ".png")) == 4


def test_an_empty_file_in_an_attention_job_has_no_map_and_no_overlay(attention_job):
    name, out = attention_job
    index = {row["key"]: row for row in read_index(out).to_pylist()}
    assert index[EMPTY]["error"] and index[EMPTY]["row"] == -1 and index[EMPTY]["overlay"] is None
    keys, maps = read_arrays(out, "rollout")
    assert EMPTY not in keys and len(maps) == len(GOOD)


def test_readers_take_a_plain_local_path_as_well_as_a_uri(embed_job):
    _, out = embed_job
    plain = out[len("file://"):] if out.startswith("file://") else out
    from urllib.parse import unquote

    assert read_index(unquote(plain)).equals(read_index(out))
    assert read_embeddings(unquote(plain), "cls")[0] == read_embeddings(out, "cls")[0]
