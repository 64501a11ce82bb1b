"""Tiny models of the classes the hub publishes the checkpoints people use as (no download).

`ViTModel` (in21k, with a pooler), `Dinov2Model`, `ViTMAEModel` (mask_ratio 0.75 in its config,
as facebook/vit-mae-* say), `CLIPModel` and `SiglipModel` (with their text towers and a
tokenizer), each saved with `save_pretrained` next to its own image processor class. The
tokenizer is a small word-level one built with the `tokenizers` library (the hub's CLIP and
SigLIP vocabularies cannot be downloaded here); it is saved and loaded the way the real
ones are, through `AutoTokenizer`.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ["a", "photo", "of", "the", "cat", "dog", "car", "bird", "red", "blue", "green", "square", "circle",
         "noise", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "."]
SIZE = 32
VISION = {"image_size": SIZE, "patch_size": 4, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 64}
TEXT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "max_position_embeddings": 16}
CHECKPOINTS = ("vit-model", "dinov2-model", "vit-mae-model", "clip-model", "siglip-model", "clip-vision-projection")
DUAL = ("clip-model", "siglip-model")


def save_tokenizer(directory: Path) -> dict:
    """A word-level tokenizer with <pad>, <bos>, <eos>, <unk>; returns the special token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>", model_max_length=TEXT["max_position_embeddings"])
    fast.save_pretrained(directory)
    return {"pad": 0, "bos": 1, "eos": 2, "vocab": len(vocab)}


def build_checkpoint(name: str, directory: Path, seed: int = 0) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    vit_processor = tf.ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.4, 0.45, 0.5],
                                         image_std=[0.2, 0.25, 0.3])
    if name == "vit-model":  # google/vit-base-patch16-224-in21k: a ViTModel with its pooler
        model, processor = tf.ViTModel(tf.ViTConfig(**VISION)), vit_processor
    elif name == "dinov2-model":
        config = tf.Dinov2Config(**{k: v for k, v in VISION.items() if k != "intermediate_size"}, mlp_ratio=2)
        model, processor = tf.Dinov2Model(config), tf.BitImageProcessor(
            size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_center_crop=True,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    elif name == "vit-mae-model":
        model, processor = tf.ViTMAEModel(tf.ViTMAEConfig(**VISION, mask_ratio=0.75)), vit_processor
    elif name in ("clip-model", "clip-vision-projection"):
        ids = save_tokenizer(directory) if name == "clip-model" else {"vocab": 40, "eos": 2, "bos": 1, "pad": 0}
        text = tf.CLIPTextConfig(**TEXT, vocab_size=ids["vocab"], eos_token_id=ids["eos"], bos_token_id=ids["bos"],
                                 pad_token_id=ids["pad"])
        config = tf.CLIPConfig(text_config=text.to_dict(), vision_config=tf.CLIPVisionConfig(**VISION).to_dict(),
                               projection_dim=24)
        model = tf.CLIPModel(config) if name == "clip-model" else tf.CLIPVisionModelWithProjection(
            tf.CLIPVisionConfig(**VISION, projection_dim=24))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    elif name == "siglip-model":
        ids = save_tokenizer(directory)
        text = tf.SiglipTextConfig(**TEXT, vocab_size=ids["vocab"], projection_size=32)
        config = tf.SiglipConfig(text_config=text.to_dict(), vision_config=tf.SiglipVisionConfig(**VISION).to_dict())
        model = tf.SiglipModel(config)
        processor = tf.SiglipImageProcessor(size={"height": SIZE, "width": SIZE})
    else:
        raise ValueError(name)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory
