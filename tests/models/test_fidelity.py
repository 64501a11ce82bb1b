"""vitbatch's embeddings are the checkpoint's own: same pixels as its library's preprocessing.

For six published families (tiny models with the hub's preprocessor configs, loaded through
vitbatch's own loading code), every file of every kind vitbatch reads gets an fp32 `cls`
embedding through the real shard path (reader threads, decoder, device stage, embed head).
The reference is what a user of the library writes: `transformers.image_utils.load_image`,
`AutoImageProcessor.from_pretrained(dir)` and the model's own API; for timm,
`resolve_data_config` + `create_transform` on the PIL image and `forward_head(pre_logits=True)`.
Files vitbatch renders differently on purpose (README "Pixels") are compared with the
reference applied to that rendering. The last tests show the bar catches a one-pixel crop
shift and a reduced-scale JPEG decode.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers_fidelity import BUILDERS, DELIBERATE, image_files, reference_rendering
from helpers_models import load_model
from PIL import Image

from orchestrator.config import Settings
from orchestrator.inputs.manifest import Item
from orchestrator.inputs.planner import plan
from orchestrator.jobspec.jobs import parse_spec
from orchestrator.published.results import read_embeddings
from orchestrator.store.storage import ObjectStore, normalize_uri
from workers.context import WorkerContext
from workers.decode.imaging import decode_rgb
from workers.decode.preprocess import Decoder
from workers.heads import EmbedHead
from workers.inprocess import run_local
from workers.loaded import LoadedModel
from workers.pipeline import DecodePath
from workers.runner import run_with
from workers.stagetimes import StageTimes

BAR = 0.9999  # cosine of vitbatch's fp32 `cls` with the reference's, on every file
MAX_PIXELS = 50_000_000
HALF_PIXEL_CROPS = ("portrait-333x499.jpg", "landscape-499x333.jpg")  # crop offsets of x.5 in every crop family


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, list[Item]]:
    root = tmp_path_factory.mktemp("fidelity-images")
    for name, data in image_files().items():
        (root / name).write_bytes(data)
    return root, plan(normalize_uri(str(root)), 1000, ObjectStore(Settings())).items


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory) -> tuple[str, Path, LoadedModel]:
    name = request.param
    directory = BUILDERS[name](tmp_path_factory.mktemp(name))
    return name, directory, load_model(str(directory), device="cpu", precision="fp32")


def vitbatch_cls(model: LoadedModel, items: list[Item], decoder: Decoder) -> dict[str, np.ndarray]:
    """key -> the fp32 `cls` embedding an embed job computes (the shard path, threads)."""
    head = EmbedHead(model, 0, ["cls"], parquet_vectors="float32")
    run_with(model, ObjectStore(Settings()), items, head, DecodePath(decoder), StageTimes(), batch_size=8,
             read_concurrency=2, max_bytes=1 << 28)
    assert head.errors == 0, head.rows
    return {items[index].key: vector for index, vector in head.arrays["cls"].items()}


def reference_model(name: str, directory: Path):
    if name == "timm-vit-b16":
        import timm

        return timm.create_model(f"local-dir:{directory}", pretrained=True).eval()
    import transformers

    cls = transformers.ViTForImageClassification if name == "vit-imagenet" else transformers.AutoModel
    return cls.from_pretrained(directory).eval()


def reference_cls(name: str, directory: Path, module, image: Image.Image) -> np.ndarray:
    """The embedding the library's own preprocessing and the model's own API give."""
    with torch.inference_mode():
        if name == "timm-vit-b16":
            import timm

            transform = timm.data.create_transform(**timm.data.resolve_data_config(model=module))
            tokens = module.forward_features(transform(image).unsqueeze(0))
            return module.forward_head(tokens, pre_logits=True)[0].numpy()
        from transformers import AutoImageProcessor

        pixels = AutoImageProcessor.from_pretrained(directory)(images=image, return_tensors="pt")["pixel_values"]
        if name in ("clip-b32", "siglip-b16"):
            return module.get_image_features(pixel_values=pixels).pooler_output[0].numpy()
        tower = module.vit if name == "vit-imagenet" else module
        return tower(pixel_values=pixels).last_hidden_state[0, 0].numpy()


def references(family, files) -> dict[str, np.ndarray]:
    name, directory, _model = family
    root, items = files
    module = reference_model(name, directory)
    return {item.key: reference_cls(name, directory, module, reference_rendering(item.key, root / item.key))
            for item in items}


def cosines(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> dict[str, float]:
    def cosine(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.astype(np.float64), b.astype(np.float64)
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    return {key: cosine(ours[key], theirs[key]) for key in theirs}


@pytest.fixture(scope="module")
def reference_embeddings(family, files) -> dict[str, np.ndarray]:
    return references(family, files)


def test_every_file_embeds_as_the_checkpoints_own_preprocessing_does(family, files, reference_embeddings):
    _name, _directory, model = family
    _root, items = files
    found = cosines(vitbatch_cls(model, items, Decoder(model.prep, MAX_PIXELS)), reference_embeddings)
    assert len(found) == len(image_files())
    assert {key: c for key, c in found.items() if c < BAR} == {}, f"min cosine {min(found.values()):.6f}"


def test_deliberate_renderings_differ_from_load_image_and_only_there(files):
    """The README's table is true: alpha and 16-bit files are where vitbatch's rendering is not
    `load_image`'s; every other kind of file gets the same RGB pixels."""
    from transformers.image_utils import load_image

    root, items = files
    differing = {item.key for item in items
                 if not np.array_equal(np.asarray(decode_rgb((root / item.key).read_bytes())),
                                       np.asarray(load_image(str(root / item.key))))}
    assert differing == set(DELIBERATE)


def test_a_one_pixel_crop_shift_falls_below_the_bar(files, tmp_path):
    """The other library's crop rounding moves a half-pixel crop by one pixel: the bar sees it."""
    for name in ("clip-b32", "timm-vit-b16"):
        directory = BUILDERS[name](tmp_path / name)
        model = load_model(str(directory), device="cpu", precision="fp32")
        other = "round" if model.prep.crop_rounding == "floor" else "floor"
        shifted = dataclasses.replace(model, prep=dataclasses.replace(model.prep, crop_rounding=other))
        items = [item for item in files[1] if item.key in HALF_PIXEL_CROPS]
        theirs = references((name, directory, model), (files[0], items))
        found = cosines(vitbatch_cls(shifted, items, Decoder(shifted.prep, MAX_PIXELS)), theirs)
        assert max(found.values()) < BAR, (name, found)


def test_a_reduced_scale_jpeg_decode_falls_below_the_bar(files, tmp_path):
    """`--jpeg-decode fast` (PIL's draft) is not the checkpoint's pixels: the bar sees it."""
    directory = BUILDERS["clip-b32"](tmp_path / "clip")
    model = load_model(str(directory), device="cpu", precision="fp32")
    items = [item for item in files[1] if item.key == "large-4000x3000.jpg"]
    theirs = references(("clip-b32", directory, model), (files[0], items))
    assert cosines(vitbatch_cls(model, items, Decoder(model.prep, MAX_PIXELS)), theirs)[items[0].key] >= BAR
    fast = cosines(vitbatch_cls(model, items, Decoder(model.prep, MAX_PIXELS, fast=True)), theirs)
    assert fast[items[0].key] < BAR


def test_fast_jpeg_decode_is_a_job_option_its_records_name(files, tmp_path):
    """--jpeg-decode fast reaches the workers: the large JPEG's embedding moves, a small file's does
    not, and the spec (_job.json), every marker's compute and _SUCCESS.json's computed_with say so."""
    directory = BUILDERS["clip-b32"](tmp_path / "clip")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("large-4000x3000.jpg", "portrait-333x499.jpg"):
        (inputs / name).write_bytes((files[0] / name).read_bytes())
    ctx, jobs = WorkerContext(Settings()), {}
    for mode in ("exact", "fast"):
        option = {"jpeg_decode": "fast"} if mode == "fast" else {}  # exact is the default
        spec = parse_spec({"kind": "embed", "input": str(inputs), "output": str(tmp_path / mode),
                           "model": str(directory), "device": "cpu", "precision": "fp32", **option})
        _job_id, markers = run_local(spec, ctx)
        record = json.loads((tmp_path / mode / "_SUCCESS.json").read_text())
        submitted = json.loads((tmp_path / mode / record["job_dir"] / "_job.json").read_text())
        keys, cls = read_embeddings(spec.output, "cls")
        jobs[mode] = (submitted["spec"]["jpeg_decode"], {m.compute for m in markers}, record["computed_with"],
                      dict(zip(keys, cls.astype(np.float64))))
    assert jobs["exact"][:3] == ("exact", {"cpu fp32"}, {"cpu fp32": 1})
    assert jobs["fast"][:3] == ("fast", {"cpu fp32 jpeg-fast"}, {"cpu fp32 jpeg-fast": 1})
    exact, fast = jobs["exact"][3], jobs["fast"][3]
    assert np.array_equal(exact["portrait-333x499.jpg"], fast["portrait-333x499.jpg"])  # under twice the target
    assert not np.array_equal(exact["large-4000x3000.jpg"], fast["large-4000x3000.jpg"])
