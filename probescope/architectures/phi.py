"""Phi (Phi-1, Phi-1.5, Phi-2): blocks at ``model.layers``; one layer norm feeds
attention and MLP, which run in parallel; partial rotary positions."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class PhiAdapter(ArchitectureAdapter):
    name = "phi"
    model_types = ("phi",)
    block_paths = ("model.layers", "layers")
    description = "Phi-1, Phi-1.5, Phi-2 (PhiForCausalLM, PhiModel)"
    component_modules = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.dense",
        "mlp.up": "mlp.fc1",
        "mlp.down": "mlp.fc2",
    }
    final_norm_path = "final_layernorm"
    mlp_path = "mlp"
    mlp_norm_path = "input_layernorm"  # shared with attention
    attention_path = "self_attn"
    scores_call = ("attention_interface_1", 1)
    rotary = ("the first `partial_rotary_factor` of each head's features rotated (rotate-half), the "
              "rest unrotated; after `q_layernorm`/`k_layernorm` where the config turns them on")

    def parallel(self, config: Any) -> bool:
        return True


@hookimpl
def register_architectures(register):
    register(PhiAdapter())
