"""Tiny randomly initialised CLIP and LLaVA checkpoints, with processors, built offline.

They exercise the retrieval, zero-shot and VQA pipelines end to end (loading from a folder, processors, chat
templates, generation, FNA in the vision tower) without the Hub. Their weights are random: their metrics mean
nothing. The tokenizers are word-level `tokenizers` models over a given vocabulary (lower-cased, split on whitespace
and punctuation; unknown words map to an unknown token).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# A chat template in the spirit of LLaVA-1.5 ("USER: <image>\n... ASSISTANT:"), for the tiny word-level tokenizer.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image> {% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} {% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
_SPECIAL = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "image": "<image>"}


def vocabulary(texts: Iterable[str]) -> list[str]:
    """Sorted distinct lower-case words and punctuation marks of `texts`."""
    return sorted({token for text in texts for token in re.findall(r"\w+|[^\w\s]", text.lower())})


def word_level_tokenizer(words: Iterable[str], add_bos_eos: bool, image_token: bool = False) -> Any:
    """A `PreTrainedTokenizerFast` over `words` plus <pad>, <unk>, <s>, </s> (and <image>) special tokens.

    With `add_bos_eos` every encoded text is wrapped in <s> ... </s> (CLIP's text tower pools at </s>).
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [_SPECIAL[k] for k in ("pad", "unk", "bos", "eos")] + ([_SPECIAL["image"]] if image_token else [])
    vocab = {
        token: index for index, token in enumerate(specials + [w for w in dict.fromkeys(words) if w not in specials])
    }
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=_SPECIAL["unk"]))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos_eos:
        bos, eos = _SPECIAL["bos"], _SPECIAL["eos"]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", special_tokens=[(bos, vocab[bos]), (eos, vocab[eos])]
        )
    extra = {"extra_special_tokens": {"image_token": _SPECIAL["image"]}} if image_token else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=_SPECIAL["pad"],
        unk_token=_SPECIAL["unk"],
        bos_token=_SPECIAL["bos"],
        eos_token=_SPECIAL["eos"],
        model_max_length=512,
        **extra,
    )


def _tiny_vision(image_size: int, patch_size: int) -> dict[str, Any]:
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def _image_processor(image_size: int) -> Any:
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def build_tiny_clip(folder: str, words: Iterable[str], image_size: int = 32, patch_size: int = 4, seed: int = 0) -> str:
    """Save a random 2-layer `CLIPModel` (text and vision width 32) and its `CLIPProcessor` to `folder`."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    tokenizer = word_level_tokenizer(words, add_bos_eos=True)
    text = {
        **_tiny_vision(image_size, patch_size),
        "vocab_size": len(tokenizer),
        "max_position_embeddings": 64,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for key in ("image_size", "patch_size"):
        del text[key]
    config = CLIPConfig(text_config=text, vision_config=_tiny_vision(image_size, patch_size), projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=_image_processor(image_size), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def build_tiny_llava(
    folder: str, words: Iterable[str], image_size: int = 32, patch_size: int = 4, seed: int = 0
) -> str:
    """Save a random `LlavaForConditionalGeneration` (2-layer CLIP vision tower, 2-layer Llama) and its
    `LlavaProcessor` (word-level tokenizer, `LLAVA_CHAT_TEMPLATE`) to `folder`."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = word_level_tokenizer([*words, "user", "assistant", ":"], add_bos_eos=False, image_token=True)
    tokenizer.padding_side = "left"  # batched generation
    ids = {
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    text = {
        "model_type": "llama",
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        **ids,
    }
    config = LlavaConfig(
        vision_config={"model_type": "clip_vision_model", **_tiny_vision(image_size, patch_size)},
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(_SPECIAL["image"]),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for key, value in ids.items():
        setattr(model.generation_config, key, value)
    model.save_pretrained(folder)
    processor = LlavaProcessor(
        image_processor=_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder
