"""GPT-NeoX (Pythia): blocks at ``gpt_neox.layers``; one ``query_key_value`` module whose
output interleaves query, key and value per head; attention and MLP in parallel unless
the config turns ``use_parallel_residual`` off."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter, Component, Features
from probescope.plugins import hookimpl


class GPTNeoXAdapter(ArchitectureAdapter):
    name = "gpt_neox"
    model_types = ("gpt_neox",)
    block_paths = ("gpt_neox.layers", "layers")
    description = "GPT-NeoX and Pythia (GPTNeoXForCausalLM, GPTNeoXModel); attention and MLP in parallel unless the config sets use_parallel_residual = false"
    component_modules = {
        "attn.q": "attention.query_key_value",
        "attn.k": "attention.query_key_value",
        "attn.v": "attention.query_key_value",
        "attn.o": "attention.dense",
        "mlp.up": "mlp.dense_h_to_4h",
        "mlp.down": "mlp.dense_4h_to_h",
    }
    fused = {
        "attn.q": "`query_key_value`, per head: features [0, h) of each [q, k, v] group of 3h",
        "attn.k": "`query_key_value`, per head: features [h, 2h) of each group",
        "attn.v": "`query_key_value`, per head: features [2h, 3h) of each group",
    }
    final_norm_path = "final_layer_norm"
    mlp_path = "mlp"
    # Its own norm in front of the MLP, in parallel and sequential blocks alike.
    mlp_norm_path = "post_attention_layernorm"
    attention_path = "attention"
    scores_call = ("attention_interface_1", 1)
    rotary = ("the first `rotary_pct` of each head's features rotated (rotate-half: feature i pairs "
              "with i + r/2), the rest as they come out of `query_key_value`")

    def components(self, config: Any) -> dict[str, Component]:
        shape = self.attention_shape(config)
        hd = shape.head_dim
        parts = super().components(config)
        for i, name in enumerate(("attn.q", "attn.k", "attn.v")):
            parts[name] = Component("attention.query_key_value", Features(shape.n_heads, 3 * hd, i * hd, hd))
        return parts

    def parallel(self, config: Any) -> bool:
        return bool(getattr(config, "use_parallel_residual", True))

    def resid_mid_port(self, config: Any) -> tuple[str, str]:
        """`post_attention_layernorm` input where the config sets use_parallel_residual = false; none in parallel blocks (the default)"""
        return super().resid_mid_port(config)


@hookimpl
def register_architectures(register):
    register(GPTNeoXAdapter())
