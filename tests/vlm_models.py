"""Tiny vision-language models for the tests: Llava, Idefics3 (SmolVLM's layout), PaliGemma
and Qwen2-VL, each built from a config with random weights and a processor made here
(the demo's byte-level BPE tokenizer plus each family's image tokens, and the family's
PIL image processor at a few pixels a side). Nothing is downloaded.

The PIL image processors are used because torchvision is not installed: transformers
falls back to them by itself. Qwen2-VL's processor also holds a video processor, which
needs torchvision; probescope builds it without one (``models.images_only_processor``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from probescope import demo
from probescope.models import images_only_processor

WIDTH = 32
LAYERS = 3


@dataclass
class TinyVLM:
    name: str
    model: Any
    processor: Any

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(folder, safe_serialization=True)
        self.processor.save_pretrained(folder)
        return folder


def _tokenizer(special: list[str]) -> Any:
    tokenizer = demo.build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": special, "pad_token": "<pad>"})
    tokenizer.padding_side = "right"
    return tokenizer


def _llama_text(tokenizer: Any, layers: int = LAYERS, width: int = WIDTH) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=256)


#: A plain chat template: one user turn, the image where the message puts it.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %} {{ part['text'] }}{% endif %}{% endfor %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


def llava(seed: int = 0, *, layers: int = LAYERS, width: int = WIDTH) -> TinyVLM:
    """CLIP vision tower (16 px, 4 px patches), Llama decoder: 16 image tokens."""
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer(["<image>"])
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=4)
    config = LlavaConfig(vision_config=vision, text_config=_llama_text(tokenizer, layers, width),
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    images = CLIPImageProcessorPil(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    return TinyVLM("llava", LlavaForConditionalGeneration(config).eval(), processor)


def idefics3(seed: int = 0) -> TinyVLM:
    """SigLIP-like vision tower (16 px tiles, 4 px patches, pixel shuffle by 2): 4 image
    tokens per tile; a 32 px image is split into 2 x 2 tiles plus a global one, each
    between ``<fake_token_around_image>`` and a row/column or global tag."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        Idefics3Processor,
        Idefics3VisionConfig,
    )

    tags = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tokenizer = _tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>", *tags])
    vision = Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=16, patch_size=4)
    config = Idefics3Config(vision_config=vision, text_config=_llama_text(tokenizer), scale_factor=2,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16},
                                       do_image_splitting=True)
    processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                  chat_template=CHAT_TEMPLATE)
    torch.manual_seed(seed)
    return TinyVLM("idefics3", Idefics3ForConditionalGeneration(config).eval(), processor)


def paligemma(seed: int = 0) -> TinyVLM:
    """SigLIP vision tower (16 px, 4 px patches), Gemma decoder: 16 image tokens, then BOS,
    the prompt and a newline, all one bidirectional prefix."""
    from transformers import (
        GemmaConfig,
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessorPil,
        SiglipVisionConfig,
    )

    tokenizer = _tokenizer(["<image>"])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=4)
    text = GemmaConfig(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                       num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                       max_position_embeddings=256)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=WIDTH,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    images = SiglipImageProcessorPil(size={"height": 16, "width": 16})
    images.image_seq_length = 16
    processor = PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    torch.manual_seed(seed)
    return TinyVLM("paligemma", PaliGemmaForConditionalGeneration(config).eval(), processor)


def qwen2_vl(seed: int = 0) -> TinyVLM:
    """Qwen2-VL vision tower (4 px patches, 2 x 2 merge), Qwen2-VL text decoder (rotary
    positions in three sections): an image of h x w pixels becomes (h/8) x (w/8) image
    tokens between ``<|vision_start|>`` and ``<|vision_end|>``."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    tokenizer = _tokenizer(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"])
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    eos = tokenizer.eos_token_id
    config = Qwen2VLConfig(
        vision_config=dict(depth=1, embed_dim=16, hidden_size=WIDTH, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=WIDTH, intermediate_size=2 * WIDTH,
                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, bos_token_id=eos, eos_token_id=eos,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        bos_token_id=eos, eos_token_id=eos, **ids,
    )
    images = Qwen2VLImageProcessorPil(min_pixels=16 * 16, max_pixels=32 * 32, patch_size=4, merge_size=2,
                                      temporal_patch_size=2)
    processor = images_only_processor(config)(image_processor=images, tokenizer=tokenizer,
                                              chat_template=CHAT_TEMPLATE.replace(
                                                  "<image>", "<|vision_start|><|image_pad|><|vision_end|>"))
    torch.manual_seed(seed)
    return TinyVLM("qwen2_vl", Qwen2VLForConditionalGeneration(config).eval(), processor)


BUILDERS: dict[str, Callable[..., TinyVLM]] = {
    "llava": llava, "idefics3": idefics3, "paligemma": paligemma, "qwen2_vl": qwen2_vl,
}


def picture(height: int = 40, width: int = 24, seed: int = 0) -> Any:
    """A random RGB picture (PIL)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
