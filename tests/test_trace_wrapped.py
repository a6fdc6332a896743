"""trace.wrapped() hands a model back as it was, keeping what the model set on itself.

transformers marks a module ``_output_capturing_hooks_installed`` the first time it runs
and leaves the hooks registered; removing the mark during clean-up would make the next
plain forward install them a second time (a Llava model then gets ``None`` vision
features). Only what nnsight added may go.
"""

from __future__ import annotations

import copy

import torch

from probescope import trace


def tiny_llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                              num_attention_heads=2, image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=60)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval()


def test_plain_forward_after_a_trace_gives_the_same_output():
    model = tiny_llava()
    ids = torch.tensor([[1, 2] + [60] * 4 + [5, 6]])  # 16x16 image, 8x8 patches: 4 image tokens
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = copy.deepcopy(model)(input_ids=ids, pixel_values=pixels).logits
    before = {name: set(module.__dict__) for name, module in model.named_modules()}

    with trace.wrapped(model) as envoy, torch.inference_mode():
        with envoy.trace(ids, pixel_values=pixels, use_cache=False):
            envoy.model.language_model.layers[0].output.save()

    # The first forward ran inside the trace, so the flag was set there; it must stay.
    assert model.model.vision_tower.__dict__.get("_output_capturing_hooks_installed") is True
    for name, module in model.named_modules():
        added = set(module.__dict__) - before[name]
        assert added <= {"_output_capturing_hooks_installed"}, (name, added)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids, pixel_values=pixels).logits, expected)


def test_attributes_a_module_sets_on_itself_survive():
    class Marks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return self.linear(x)

    model = Marks()
    with trace.wrapped(model) as envoy, torch.inference_mode():
        with envoy.trace(torch.ones(1, 3)):
            envoy.linear.output.save()
    assert model.__dict__["calls"] == 1
    assert "forward" not in model.__dict__ and not any(k.startswith("__nnsight") for k in model.__dict__)
