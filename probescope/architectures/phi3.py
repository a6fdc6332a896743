"""Phi-3: Llama's layout with fused modules: ``qkv_proj`` holds query, key and value
side by side (grouped-query widths), and ``gate_up_proj`` holds the MLP's gate then its
up projection."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter, Component, Features
from probescope.plugins import hookimpl


class Phi3Adapter(ArchitectureAdapter):
    name = "phi3"
    model_types = ("phi3",)
    block_paths = ("model.layers", "layers")
    description = "Phi-3, Phi-3.5, Phi-4 (Phi3ForCausalLM, Phi3Model)"
    component_modules = {
        "attn.q": "self_attn.qkv_proj",
        "attn.k": "self_attn.qkv_proj",
        "attn.v": "self_attn.qkv_proj",
        "attn.o": "self_attn.o_proj",
        "mlp.gate": "mlp.gate_up_proj",
        "mlp.up": "mlp.gate_up_proj",
        "mlp.down": "mlp.down_proj",
    }
    fused = {
        "attn.q": "`qkv_proj` features [0, heads * h)",
        "attn.k": "`qkv_proj` the next kv_heads * h features",
        "attn.v": "`qkv_proj` the last kv_heads * h features",
        "mlp.gate": "`gate_up_proj` first half",
        "mlp.up": "`gate_up_proj` second half",
    }
    final_norm_path = "norm"
    mlp_path = "mlp"
    mlp_norm_path = "post_attention_layernorm"
    attention_path = "self_attn"
    scores_call = ("attention_interface_1", 1)
    rotary = ("the first `partial_rotary_factor` (by default all) of each head's features rotated "
              "(rotate-half), the rest unrotated")

    def components(self, config: Any) -> dict[str, Component]:
        shape = self.attention_shape(config)
        q, kv = shape.n_heads * shape.head_dim, shape.n_kv_heads * shape.head_dim
        total = q + 2 * kv
        inner = int(config.intermediate_size)
        parts = super().components(config)
        parts["attn.q"] = Component("self_attn.qkv_proj", Features.span(0, q, total))
        parts["attn.k"] = Component("self_attn.qkv_proj", Features.span(q, q + kv, total))
        parts["attn.v"] = Component("self_attn.qkv_proj", Features.span(q + kv, total, total))
        parts["mlp.gate"] = Component("mlp.gate_up_proj", Features.span(0, inner, 2 * inner))
        parts["mlp.up"] = Component("mlp.gate_up_proj", Features.span(inner, 2 * inner, 2 * inner))
        return parts


@hookimpl
def register_architectures(register):
    register(Phi3Adapter())
