"""GPT-2: blocks at ``transformer.h``; learned positions; ``Conv1D`` layers store
weights as (in, out); query, key and value come out of one fused ``c_attn``."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter, Component, Features
from probescope.plugins import hookimpl


class GPT2Adapter(ArchitectureAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    block_paths = ("transformer.h", "h")
    description = "GPT-2 (GPT2LMHeadModel, GPT2Model)"
    component_modules = {
        "attn.q": "attn.c_attn",
        "attn.k": "attn.c_attn",
        "attn.v": "attn.c_attn",
        "attn.o": "attn.c_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    }
    fused = {
        "attn.q": "`c_attn` features [0, d)",
        "attn.k": "`c_attn` features [d, 2d)",
        "attn.v": "`c_attn` features [2d, 3d)",
    }
    final_norm_path = "ln_f"
    mlp_path = "mlp"
    mlp_norm_path = "ln_2"
    attention_path = "attn"
    rotary = "no rotary position embedding: learned absolute positions (`wpe`) are added to the embeddings"

    def components(self, config: Any) -> dict[str, Component]:
        d = self.hidden_size(config)
        parts = super().components(config)
        for i, name in enumerate(("attn.q", "attn.k", "attn.v")):
            parts[name] = Component("attn.c_attn", Features.span(i * d, (i + 1) * d, 3 * d))
        return parts


@hookimpl
def register_architectures(register):
    register(GPT2Adapter())
