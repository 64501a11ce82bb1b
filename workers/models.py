"""Load models by reference and keep them cached per worker process.

Preprocessing always comes from the model itself (the HF image processor or
timm's data config, read in workers/processors.py); nothing here assumes 224 pixels
or ImageNet statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import torch

from orchestrator.config import Settings
from orchestrator.errors import SpecError
from orchestrator.jobspec.modelkinds import Checkpoint, ModelKind, checkpoint_kind
from orchestrator.jobspec.modelrefs import is_onnx, normalize_model_ref
from orchestrator.store.storage import ObjectStore
from workers.decode.preprocess import Preprocess
from workers.errors import ModelLoadError
from workers.families import Family, HFBackbone, HFClassifier, HFDualEncoder, Timm
from workers.loaded import DTYPES, LoadedModel, store_autocast_weights
from workers.memory import long_lived, release_frozen
from workers.modelfiles import check_model_dir, local_model_dir, read_local_config
from workers.processors import hf_preprocess, timm_preprocess  # noqa: F401 (training reads them here)


def resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was asked for but this worker has no CUDA device")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_batch_size(device: torch.device) -> int:
    """256 fills an H100 with ViT-B/16 (out-of-memory halves it); on a CPU a ViT runs faster in
    batches that stay in cache (ViT-Tiny/16 here: about 37 img/s at 16, 27 at 64). Compiled, the
    model alone is faster at 32, the whole job is not: bench/RESULTS.md, tenth session."""
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


def model_family(ref: str, path: Path | None) -> str:
    """The library, hf or timm: from the reference's scheme, else from the directory's config.json."""
    if ref.startswith("timm:"):
        return "timm"
    if ref.startswith("hf:"):
        return "hf"
    assert path is not None  # a reference without a scheme names a directory
    return "timm" if "architecture" in check_model_dir(path, allow_pickle=True) else "hf"


def hf_checkpoint(ref: str, name: str, config: dict | None) -> Checkpoint:
    """What an HF checkpoint is: from its directory's config.json, or the hub's (cache) config."""
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(name, trust_remote_code=False).to_dict()
        except (OSError, ValueError, KeyError) as e:
            raise ModelLoadError(f"model 'hf:{name}' not found locally and the hub is unreachable or has no such "
                                 f"repo ({_first_line(e)}): pass a local directory or s3:// URI") from e
    try:
        return checkpoint_kind(ref, config)
    except SpecError as e:
        raise ModelLoadError(str(e)) from e


def _hf_class(checkpoint: Checkpoint):
    import transformers

    if checkpoint.model_kind is ModelKind.CLASSIFIER:
        return transformers.AutoModelForImageClassification
    if checkpoint.model_kind is ModelKind.VISION_TOWER:  # one of modelkinds.TOWER_ARCHITECTURES, never a free name
        return getattr(transformers, checkpoint.architecture)
    return transformers.AutoModel  # backbones (ViTMAEForPreTraining -> ViTMAEModel) and dual encoders


def _load_hf(name: str, checkpoint: Checkpoint, attn: str, allow_pickle: bool = False
             ) -> tuple[torch.nn.Module, Preprocess, dict[int, str], Family]:
    from transformers import AutoImageProcessor

    # trust_remote_code=False said out loud: otherwise transformers asks on a terminal. Without
    # allow_pickle only safetensors are read, even where a pytorch_model.bin sits next to them.
    options: dict[str, Any] = {"trust_remote_code": False, "use_safetensors": None if allow_pickle else True}
    if checkpoint.model_type == "vit_mae":
        options["mask_ratio"] = 0.0  # every patch, in order (see families.HFBackbone)
    try:
        module, info = _hf_class(checkpoint).from_pretrained(name, dtype=torch.float32, attn_implementation=attn,
                                                             output_loading_info=True, **options)
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
    family = _hf_family(module, checkpoint, name, info)
    id2label = {int(i): str(v) for i, v in module.config.id2label.items()} if family.has_classifier else {}
    return module, hf_preprocess(processor), id2label, family


def _hf_family(module: torch.nn.Module, checkpoint: Checkpoint, name: str, info: dict) -> Family:
    if checkpoint.model_kind in (ModelKind.DUAL, ModelKind.VISION_TOWER):
        tokenizer = _tokenizer(name) if checkpoint.model_kind is ModelKind.DUAL else None
        return HFDualEncoder(module, tokenizer, checkpoint.model_kind)
    if checkpoint.model_kind is ModelKind.BACKBONE:
        return HFBackbone(module)
    family = HFClassifier(module)
    # Weights the checkpoint lacks were initialised at random: a head among them classifies nothing.
    prefix = str(module.base_model_prefix) + "."
    if any(not key.startswith(prefix) for key in info.get("missing_keys", ())):
        family.has_classifier = False
    return family


def _tokenizer(name: str):
    """The text side's tokenizer, where the checkpoint ships one (zero-shot needs it; embed does not)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    except ImportError as e:  # SigLIP's SiglipTokenizer needs sentencepiece: the install, not the model, is wrong
        raise ModelLoadError(f"the tokenizer of {name} needs a library this worker lacks ({_first_line(e)}): "
                             "install the worker extra, pip install 'vitbatch[worker]' (sentencepiece, protobuf)") from e


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_timm(name: str, config: dict | None, allow_pickle: bool
               ) -> tuple[torch.nn.Module, Preprocess, dict[int, str], Family]:
    import timm

    try:
        module: Any = timm.create_model(name, pretrained=True)  # asked for default_cfg, num_classes...
    except (RuntimeError, OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelLoadError(f"model 'timm:{name}' cannot be loaded ({type(e).__name__}: {_first_line(e)}): "
                             "pass a local directory or s3:// URI") from e
    prep = timm_preprocess(module)
    if config is None:  # a hub name: what the directory's config.json would have said
        config = {"architecture": module.default_cfg.get("architecture", name.split(".")[0]),
                  "num_classes": module.num_classes, "pretrained_cfg": module.pretrained_cfg}
    family = Timm(module, checkpoint_kind(f"timm:{name}", config).classifier)
    if not family.has_classifier:
        return module, prep, {}, family
    names = module.pretrained_cfg.get("label_names") or config.get("label_names")
    if not names and module.num_classes == 1000:
        names = timm.data.ImageNetInfo().label_names()
    id2label = {i: (names[i] if names else str(i)) for i in range(module.num_classes)}
    return module, prep, id2label, family


def fingerprint(module: torch.nn.Module, prep: Preprocess) -> str:
    """sha256 over every weight and the preprocessing: changes exactly when the model's output can."""
    digest = hashlib.sha256(json.dumps(prep.to_json(), sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def load(ref: str, device: str = "auto", precision: str = "auto", *, settings: Settings, store: ObjectStore,
         attn: str = "sdpa", compile: bool = False, allow_pickle: bool = False) -> LoadedModel:
    """The model a reference names, loaded as what its checkpoint is (orchestrator.jobspec.modelkinds).

    `settings` and `store` come from the caller's edge (a worker's context, a bench script, a
    test): an s3:// model is fetched through that store into that settings' model cache."""
    ref = normalize_model_ref(ref)  # a plain directory path, as a bench script or a test passes it
    torch_device = resolve_device(device)
    dtype = resolve_dtype(precision, torch_device)
    path = local_model_dir(ref, store, settings)
    if path is not None and is_onnx(read_local_config(path)):
        from workers.onnx.runtime import load_onnx

        return load_onnx(ref, path, device)
    config = check_model_dir(path, allow_pickle) if path is not None else None
    name = str(path) if path is not None else ref.split(":", 1)[1]
    if model_family(ref, path) == "hf":
        module, prep, id2label, family = _load_hf(name, hf_checkpoint(ref, name, config), attn, allow_pickle)
    else:
        module, prep, id2label, family = _load_timm(f"local-dir:{name}" if path is not None else name, config,
                                                    allow_pickle)
    module.eval().requires_grad_(False)
    if attn == "eager":  # timm: the unfused path computes the softmax that attention maps read
        attention: list[Any] = [sub for sub in module.modules() if hasattr(sub, "fused_attn")]
        for sub in attention:
            sub.fused_attn = False
    fp = fingerprint(module, prep)
    # On CUDA the weights themselves are cast; on CPU, fp16/bf16 run under autocast (workers.compute).
    module = module.to(torch_device, dtype=dtype if torch_device.type == "cuda" else torch.float32)
    if torch_device.type == "cpu":  # autocast's own casts of linear and conv weights, made once
        store_autocast_weights(module, family, dtype)
    if compile:
        # One static graph: the device stage pads every batch to one size (a dynamic batch dimension
        # measured no faster than eager). The compiled kernels persist beside the model cache, so a
        # worker's next start with the same model and batch compiles in seconds, not a minute.
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(settings.model_cache_dir).expanduser() / "torch-compile"))
        module = cast(torch.nn.Module, torch.compile(module, dynamic=False))
        family.module = module
    return LoadedModel(ref, family, module, prep, id2label, torch_device, dtype, fp, static_batch=compile)


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
