"""One adapter per model family: everything heads, attention, export and training ask of a model.

The families differ in where the answers are (timm's `forward_features`/`forward_head`, an HF
classifier's `base_model`, CLIP's `vision_model` + `visual_projection`, SigLIP's attention-pool
head), not in the questions. Each adapter is bound to its module and answers:

- `logits(pixels)`: class scores, only where the checkpoint has a trained classifier;
- `embed(pixels)`: the normalized final tokens [B, T, hidden], the model's own image
  embedding (`cls`) and, where it has one apart from that, its unprojected pooled output;
- `prefix_tokens`, `class_token`, `cls_source`, `grid`, `depth`, `attentions(pixels)`;
- `classifier` (fine-tuning trains it alone with --freeze-backbone);
- dual encoders also `text_embeddings(prompts)` and `image_text_scores(image, text)`.

A new family is one class here and one row in orchestrator/jobspec/modelkinds.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from orchestrator.jobspec.modelkinds import ModelKind
from workers.errors import ModelLoadError


@dataclass
class Embedded:
    """One forward pass's embedding outputs."""

    tokens: torch.Tensor  # [B, T, hidden], the final normalized state, prefix tokens first
    image: torch.Tensor  # [B, D]: what the model's API calls its image representation (`cls`)
    pooled: torch.Tensor | None = None  # [B, hidden]: the unprojected pooled output, where it differs


class Family:
    """The questions every family answers; the defaults are the ViT-with-CLS-token answers."""

    model_kind: ModelKind

    def __init__(self, module: Any) -> None:
        # An HF or timm module (or export's ORT session): asked by attribute (config, base_model,
        # forward_features...), which torch's Module.__getattr__ types only as Tensor | Module.
        self.module: Any = module

    @property
    def has_classifier(self) -> bool:
        return False

    @property
    def has_pooled(self) -> bool:  # an unprojected pooled output apart from `cls` (CLIP; timm CLIP models)
        return False

    @property
    def cls_source(self) -> str:  # "cls_token", "pooled" or "projected": what `cls` is
        return "cls_token"

    @property
    def name(self) -> str:
        return self.model_kind.value

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        raise ModelLoadError(f"a {self.name} has no trained classifier")

    def embed(self, pixels: torch.Tensor) -> Embedded:
        raise NotImplementedError

    def logits_and_embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, Embedded]:
        """Both from one forward pass where the family allows (the ONNX export's graph); no logits
        without a trained classifier."""
        return (self.logits(pixels) if self.has_classifier else None), self.embed(pixels)

    @property
    def prefix_tokens(self) -> int:
        return 1

    @property
    def class_token(self) -> bool:
        return True

    def grid(self, input_size: tuple[int, int]) -> tuple[int, int]:
        patch = self.config.patch_size
        patch = patch if isinstance(patch, int) else patch[0]
        return input_size[0] // patch, input_size[1] // patch

    @property
    def depth(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def config(self):
        return self.module.config

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def classifier(self) -> torch.nn.Module:
        raise ModelLoadError(f"a {self.name} has no classifier to train")

    @property
    def zero_shot(self) -> bool:
        return False

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        raise ModelLoadError(f"a {self.name} has no text tower: zero-shot needs an image-text model")

    def image_text_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        raise ModelLoadError(f"a {self.name} has no text tower: zero-shot needs an image-text model")


class HFClassifier(Family):
    """`...ForImageClassification`: logits from the trained head, tokens from its base model.

    CLIP and SigLIP classifiers (a fine-tune's linear probe) keep their tower as `vision_model`
    and classify the mean of its final tokens (CLIP's patch tokens, SigLIP's all): that mean
    is their `cls`, as the classifier reads it.
    """

    model_kind = ModelKind.CLASSIFIER
    has_classifier: bool = True  # False where the checkpoint's head was initialised at random (models.py)

    @property
    def _tower(self) -> torch.nn.Module:
        return getattr(self.module, "vision_model", None) or self.module.base_model

    @property
    def _mean_pooled(self) -> bool:
        return hasattr(self.module, "vision_model")

    @property
    def cls_source(self) -> str:  # BEiT with mean pooling classifies its pooler's mean, not the CLS token
        return "pooled" if self._mean_pooled or getattr(self.config, "use_mean_pooling", False) else "cls_token"

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.module(pixel_values=pixels).logits

    def embed(self, pixels: torch.Tensor) -> Embedded:
        return self._embedded(self._tower(pixel_values=pixels))

    def _embedded(self, outputs) -> Embedded:
        tokens = outputs.last_hidden_state
        if self._mean_pooled:
            return Embedded(tokens, tokens[:, self.prefix_tokens:].mean(dim=1))
        image = outputs.pooler_output if self.cls_source == "pooled" else tokens[:, 0]
        return Embedded(tokens, image)

    def logits_and_embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, Embedded]:
        """The classifier's forward once; a hook on its base model keeps the hidden state it saw."""
        if not self.has_classifier:
            return None, self.embed(pixels)
        seen = []
        hook = self._tower.register_forward_hook(lambda _m, _i, outputs: seen.append(outputs))
        try:
            logits = self.module(pixel_values=pixels).logits
        finally:
            hook.remove()
        return logits, self._embedded(seen[-1])

    @property
    def config(self):
        return self._tower.config if self._mean_pooled else self.module.config

    @property
    def prefix_tokens(self) -> int:
        if self.config.model_type.startswith("siglip"):
            return 0
        return 1 + (self.config.model_type == "deit") + int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def class_token(self) -> bool:
        return not self.config.model_type.startswith("siglip")

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return list(self._tower(pixel_values=pixels, output_attentions=True).attentions)

    @property
    def classifier(self) -> torch.nn.Module:
        return self.module.classifier


class HFBackbone(HFClassifier):
    """ViTModel, DeiTModel, BeitModel, Dinov2Model (with registers), ViTMAEModel: tokens only, no head.

    MAE masks 75% of the patches at random on every call: it loads with mask_ratio 0 and gets
    the identity order as its "noise", so every patch is seen, in place, every time.
    """

    model_kind = ModelKind.BACKBONE
    has_classifier = False

    @property
    def _mae(self) -> bool:
        return self.config.model_type == "vit_mae"

    def _forward(self, pixels: torch.Tensor, **options):
        if self._mae:
            n = self.module.embeddings.patch_embeddings.num_patches
            options["noise"] = torch.arange(n, device=pixels.device, dtype=torch.float32).expand(pixels.shape[0], n)
        return self.module(pixel_values=pixels, **options)

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return Family.logits(self, pixels)

    def embed(self, pixels: torch.Tensor) -> Embedded:
        return self._embedded(self._forward(pixels))

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return list(self._forward(pixels, output_attentions=True).attentions)

    @property
    def classifier(self) -> torch.nn.Module:
        return super(HFClassifier, self).classifier  # Family's: a backbone has none


class HFDualEncoder(Family):
    """CLIP and SigLIP (the full image-text model, or its vision side alone).

    `cls` is the image embedding their API defines: CLIP's projected pooled output
    (`get_image_features`), SigLIP's attention-pool output (it has no CLS token and no
    projection); `pooled` is the pooled output before CLIP's projection. The tokens are the
    final state after the post-layernorm (CLIP normalizes only its pooled CLS token in the
    forward pass; the same LayerNorm is applied to every token here).
    """

    model_kind = ModelKind.DUAL
    has_pooled = True

    def __init__(self, module: torch.nn.Module, tokenizer=None, model_kind: ModelKind = ModelKind.DUAL) -> None:
        super().__init__(module)
        self.model_kind = model_kind
        self.tokenizer = tokenizer
        self.tower: Any = getattr(module, "vision_model", module)
        self.projection: Any = getattr(module, "visual_projection", None)
        self.siglip = self.tower.config.model_type.startswith("siglip")

    @property
    def config(self):
        return self.tower.config

    @property
    def cls_source(self) -> str:
        return "projected" if self.projection is not None else "pooled"

    @property
    def prefix_tokens(self) -> int:
        return 0 if self.siglip else 1

    @property
    def class_token(self) -> bool:
        return not self.siglip

    @property
    def zero_shot(self) -> bool:
        return self.model_kind is ModelKind.DUAL

    def embed(self, pixels: torch.Tensor) -> Embedded:
        outputs = self.tower(pixel_values=pixels)
        pooled = outputs.pooler_output
        tokens = outputs.last_hidden_state if self.siglip else self.tower.post_layernorm(outputs.last_hidden_state)
        image = self.projection(pooled) if self.projection is not None else pooled
        return Embedded(tokens, image, pooled)

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return list(self.tower(pixel_values=pixels, output_attentions=True).attentions)

    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """[labels, D] text embeddings of the prompts, as the model's own forward computes them."""
        if self.tokenizer is None:
            raise ModelLoadError("zero-shot classify needs the model's tokenizer next to its weights "
                                 "(save the processor with save_pretrained)")
        # SigLIP was trained on max_length padding (its model card and processor say so); CLIP on the longest.
        options = ({"padding": "max_length", "max_length": self.module.config.text_config.max_position_embeddings}
                   if self.siglip else {"padding": True})
        text = self.tokenizer(prompts, return_tensors="pt", truncation=True, **options)
        text = {k: v.to(next(self.module.parameters()).device) for k, v in text.items()
                if k in ("input_ids", "attention_mask", "position_ids")}
        if self.siglip:
            text.pop("attention_mask", None)  # SiglipModel.forward is called without it in the pipeline
        return self.module.get_text_features(**text).pooler_output

    def image_text_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[B, labels] probabilities: CLIP softmax over logit_scale x cosine; SigLIP sigmoid with its bias."""
        image = image.float() / image.float().norm(dim=-1, keepdim=True)
        text = text.float() / text.float().norm(dim=-1, keepdim=True)
        logits = image @ text.t() * self.module.logit_scale.float().exp()
        if self.siglip:
            return torch.sigmoid(logits + self.module.logit_bias.float())
        return logits.softmax(dim=-1)


class Timm(Family):
    """timm models: `forward_features` -> tokens, `forward_head(pre_logits=True)` -> the embedding.

    For timm's CLIP models the "head" is the image projection (512 outputs of no class): `cls`
    is then the projected embedding, `pooled` the features before it, and there are no logits.
    """

    model_kind = ModelKind.TIMM
    has_classifier: bool = False  # set per model in __init__ (a plain attribute over Family's property)
    has_pooled: bool = False

    def __init__(self, module: torch.nn.Module, classifier: bool) -> None:
        super().__init__(module)
        self.has_classifier = classifier
        self.projects = self.has_pooled = not classifier and getattr(module, "num_classes", 0) > 0

    @property
    def cls_source(self) -> str:
        if self.projects:
            return "projected"
        module = self.module
        token = (getattr(module, "global_pool", "token") == "token" and self.class_token
                 and getattr(module, "dist_token", None) is None)
        return "cls_token" if token else "pooled"

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            return Family.logits(self, pixels)
        return self.module(pixels)

    def embed(self, pixels: torch.Tensor) -> Embedded:
        return self.logits_and_embed(pixels)[1]

    def logits_and_embed(self, pixels: torch.Tensor) -> tuple[torch.Tensor | None, Embedded]:
        tokens = self.module.forward_features(pixels)  # once; the head is cheap to run twice
        pooled = self.module.forward_head(tokens, pre_logits=True)
        if self.projects:
            return None, Embedded(tokens, self.module.forward_head(tokens), pooled)
        return (self.module.forward_head(tokens) if self.has_classifier else None), Embedded(tokens, pooled)

    @property
    def prefix_tokens(self) -> int:
        return int(getattr(self.module, "num_prefix_tokens", 1))

    @property
    def class_token(self) -> bool:
        return getattr(self.module, "cls_token", None) is not None

    def grid(self, input_size: tuple[int, int]) -> tuple[int, int]:
        rows, cols = self.module.patch_embed.grid_size
        return rows, cols

    @property
    def depth(self) -> int:
        return len(self.module.blocks)

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """timm's post-softmax attention (fused attention is switched off at load). The hooks live
        for one forward pass: the module is cached and shared, and a hook left behind would keep
        every later map alive."""
        maps: list[torch.Tensor] = []
        handles = [block.attn.attn_drop.register_forward_hook(lambda _m, _i, out: maps.append(out))
                   for block in self.module.blocks]
        try:
            self.module.forward_features(pixels)
        finally:
            for handle in handles:
                handle.remove()
        return maps

    @property
    def classifier(self) -> torch.nn.Module:
        return self.module.get_classifier()


class Onnx(Family):
    """An export job's graph on ONNX Runtime: the answers were written into its config.json.

    A headless export (backbone, CLIP, SigLIP) says `"classifier": false` and has no logits
    output; exports made before that key existed were all of classifiers. `pooled` is there
    where the source family had one apart from `cls` (config.json `outputs` lists it).
    """

    model_kind = ModelKind.ONNX

    @property
    def meta(self) -> dict:
        return self.module.meta

    @property
    def outputs_listed(self) -> dict:
        return self.meta.get("outputs") or {}

    @property
    def has_classifier(self) -> bool:
        return bool(self.meta.get("classifier", True)) and "logits" in self.outputs_listed

    @property
    def has_pooled(self) -> bool:
        return "pooled" in self.outputs_listed

    @property
    def cls_source(self) -> str:
        return str(self.meta["cls_source"])

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        if not self.has_classifier:
            return Family.logits(self, pixels)
        return self.module(pixels, ["logits"])["logits"]

    def outputs(self, pixels: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.module(pixels, names)

    @property
    def prefix_tokens(self) -> int:
        return int(self.meta["prefix_tokens"])

    @property
    def class_token(self) -> bool:
        return bool(self.meta.get("class_token", True))

    def grid(self, input_size: tuple[int, int]) -> tuple[int, int]:
        rows, cols = self.meta["grid"]
        return rows, cols

    def attentions(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        raise ModelLoadError("an ONNX export has no attention maps: attention needs the PyTorch model")
