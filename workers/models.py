"""Load models by reference and keep them cached per worker process.

Preprocessing always comes from the model itself (the HF image processor or
timm's data config); nothing here assumes 224 pixels or ImageNet statistics.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from orchestrator.config import Settings
from orchestrator.modelinfo import is_onnx
from orchestrator.storage import ObjectStore
from workers.errors import ModelLoadError
from workers.lifecycle import long_lived, release_frozen
from workers.modelfiles import check_model_dir, local_model_dir, read_config
from workers.preprocess import Preprocess

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
             "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


@dataclass
class LoadedModel:
    ref: str
    family: str  # "hf", "timm", or "onnx" (module is then a workers.onnxmodel.OrtModule)
    module: torch.nn.Module
    prep: Preprocess
    id2label: dict[int, str]
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)  # one forward at a time

    @property
    def input_size(self) -> tuple[int, int]:
        return self.prep.input_size

    @property
    def compute(self) -> str:
        """How this worker computes the outputs, for the shard's marker and the job's record:
        `auto` resolves per host, so one job's shards can differ (bf16 on an AMX host, fp32 on
        an AVX2 one, fp16 on a GPU)."""
        if self.family == "onnx":
            return f"onnxruntime {self.module.execution_provider}"
        precision = PRECISION_NAMES[self.dtype]
        autocast = self.device.type == "cpu" and precision != "fp32"  # over fp32 weights (workers.compute)
        return f"{self.device.type} {precision}" + (" autocast" if autocast else "")


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but this worker has no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """256 fills an H100 with ViT-B/16 (out-of-memory halves it); on a CPU a ViT runs faster in
    batches that stay in cache (ViT-Tiny/16 here: about 37 img/s at 16, 27 at 64)."""
    return 256 if device.type == "cuda" else 16


def cpu_has_fast_bf16() -> bool:
    """AMX or AVX512-BF16: where bf16 autocast beats fp32 on the CPU (vit_base 4.3x with AMX).

    Without them bf16 is emulated and slower than fp32 (AVX2-only hosts).
    """
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return DTYPES[precision]


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PRECISION_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def model_family(ref: str, path: Path | None) -> str:
    """The family, hf or timm: from the reference's scheme, else from the directory's config.json."""
    if ref.startswith("timm:"):
        return "timm"
    if ref.startswith("hf:"):
        return "hf"
    return "timm" if "architecture" in check_model_dir(path, allow_pickle=True) else "hf"


def _load_hf(name: str, dtype: torch.dtype, attn: str, allow_pickle: bool = False
             ) -> tuple[torch.nn.Module, Preprocess, dict[int, str]]:
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    # trust_remote_code=False said out loud: otherwise transformers asks on a terminal. Without
    # allow_pickle only safetensors are read, even where a pytorch_model.bin sits next to them.
    options = {"trust_remote_code": False, "use_safetensors": None if allow_pickle else True}
    try:
        module = AutoModelForImageClassification.from_pretrained(name, dtype=dtype, attn_implementation=attn,
                                                                 **options)
        processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        if Path(name).is_dir():
            raise ModelLoadError(f"model directory {name} cannot be loaded: {_first_line(e)}") from e
        raise ModelLoadError(
            f"model 'hf:{name}' not found locally and the hub is unreachable or has no such repo "
            f"({_first_line(e)}): pass a local directory or s3:// URI"
        ) from e
    except (ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:
        # Unknown model_type, remote code, a config that names no image model, mismatched weights.
        raise ModelLoadError(f"model 'hf:{name}' cannot be loaded ({type(e).__name__}: {_first_line(e)})") from e
    return module, hf_preprocess(processor), {int(i): str(v) for i, v in module.config.id2label.items()}


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def hf_preprocess(processor) -> Preprocess:
    size = processor.size
    resample = int(getattr(processor, "resample", Image.BILINEAR))
    mean = tuple(processor.image_mean) if getattr(processor, "do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(processor.image_std) if getattr(processor, "do_normalize", True) else (1.0, 1.0, 1.0)
    crop = None
    if getattr(processor, "do_center_crop", False) and getattr(processor, "crop_size", None):
        crop = (processor.crop_size["height"], processor.crop_size["width"])
    if size.get("shortest_edge"):
        edge = int(size["shortest_edge"])
        return Preprocess((edge, edge), resample, mean, std, shortest_edge=edge, crop=crop or (edge, edge))
    return Preprocess((int(size["height"]), int(size["width"])), resample, mean, std, crop=crop)


def _load_timm(name: str, allow_pickle: bool) -> tuple[torch.nn.Module, Preprocess, dict[int, str]]:
    import timm

    try:
        module = timm.create_model(name, pretrained=True)
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"model 'timm:{name}' cannot be loaded ({type(e).__name__}: {_first_line(e)}): "
                             "pass a local directory or s3:// URI") from e
    prep = timm_preprocess(module)
    names = module.pretrained_cfg.get("label_names")
    if not names and module.num_classes == 1000:
        names = timm.data.ImageNetInfo().label_names()
    id2label = {i: (names[i] if names else str(i)) for i in range(module.num_classes)}
    return module, prep, id2label


def timm_preprocess(module: torch.nn.Module) -> Preprocess:
    """timm's eval transform (resize the short side to size / crop_pct, center crop) as a Preprocess."""
    from timm.data.model_config import resolve_input_data_config

    # The input size the model has now (img_size=32 overrides its source cfg's 224), as save_for_hf exports it.
    config = resolve_input_data_config(module)
    height, width = config["input_size"][1:]
    resample = _RESAMPLE.get(config.get("interpolation", "bicubic"), Image.BICUBIC)
    crop_pct = float(config.get("crop_pct") or 1.0)
    # As timm's eval transform: Resize(floor(size / crop_pct)) then CenterCrop(size); for
    # non-square inputs, ResizeKeepRatio to cover the scaled size instead of a shortest edge.
    edge, cover = int(height / crop_pct), None
    if height != width:
        cover = (math.floor(height / crop_pct), math.floor(width / crop_pct))
    return Preprocess((height, width), resample, tuple(config["mean"]), tuple(config["std"]),
                      shortest_edge=edge, crop=(height, width), cover=cover)


def fingerprint(module: torch.nn.Module, prep: Preprocess) -> str:
    """sha256 over every weight and the preprocessing: changes exactly when the model's output can."""
    digest = hashlib.sha256(json.dumps(prep.to_json(), sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load(ref: str, device: str = "auto", precision: str = "auto", *, attn: str = "sdpa", compile: bool = False,
         settings: Settings | None = None, store: ObjectStore | None = None,
         allow_pickle: bool = False) -> LoadedModel:
    settings = settings or Settings()
    store = store or ObjectStore(settings)
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    path = local_model_dir(ref, store, settings)
    if path is not None and is_onnx(read_config(path)):
        from workers.onnxmodel import load_onnx

        return load_onnx(ref, path, device)
    if path is not None:
        check_model_dir(path, allow_pickle)
    family = model_family(ref, path)
    name = str(path) if path is not None else ref.split(":", 1)[1]
    if family == "hf":
        module, prep, id2label = _load_hf(name, torch.float32, attn, allow_pickle)
    else:
        module, prep, id2label = _load_timm(f"local-dir:{name}" if path is not None else name, allow_pickle)
    module.eval().requires_grad_(False)
    if attn == "eager":  # timm: the unfused path computes the softmax that attention maps read
        for sub in module.modules():
            if hasattr(sub, "fused_attn"):
                sub.fused_attn = False
    fp = fingerprint(module, prep)
    # On CUDA the weights themselves are cast; on CPU, fp16/bf16 run under autocast over fp32 weights.
    module = module.to(torch_device, dtype=dtype if torch_device.type == "cuda" else torch.float32)
    if compile:
        module = torch.compile(module, dynamic=False)  # one graph per batch shape; the last batch adds one
    return LoadedModel(ref, family, module, prep, id2label, torch_device, dtype, fp)


class ModelCache:
    """Keeps the last few loaded models; a worker loads each model once."""

    def __init__(self, settings: Settings, store: ObjectStore, capacity: int = 2) -> None:
        self.settings, self.store, self.capacity = settings, store, capacity
        self._models: OrderedDict[tuple, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, ref: str, device: str, precision: str, attn: str = "sdpa", compile: bool = False) -> LoadedModel:
        key = (ref, device, precision, attn, compile)
        with self._lock:
            if key not in self._models:
                with long_lived():  # lives as long as it stays cached: no collections while it is built
                    self._models[key] = load(ref, device, precision, attn=attn, compile=compile,
                                             settings=self.settings, store=self.store)
                if len(self._models) > self.capacity:  # one in, one out
                    self._models.popitem(last=False)
                    release_frozen()  # the evicted model's cycles were frozen with it
            self._models.move_to_end(key)
            return self._models[key]
