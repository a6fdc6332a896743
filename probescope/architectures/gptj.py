"""GPT-J: blocks at ``transformer.h``; one layer norm feeds attention and MLP, which run
in parallel; rotary positions on part of each head."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class GPTJAdapter(ArchitectureAdapter):
    name = "gptj"
    model_types = ("gptj",)
    block_paths = ("transformer.h", "h")
    description = "GPT-J (GPTJForCausalLM, GPTJModel)"
    component_modules = {
        "attn.q": "attn.q_proj",
        "attn.k": "attn.k_proj",
        "attn.v": "attn.v_proj",
        "attn.o": "attn.out_proj",
        "mlp.up": "mlp.fc_in",
        "mlp.down": "mlp.fc_out",
    }
    final_norm_path = "ln_f"
    mlp_path = "mlp"
    mlp_norm_path = "ln_1"  # shared with attention
    attention_path = "attn"
    scores_call = ("self__attn_0", 0)  # self._attn(query, key, value, mask)
    rotary = ("the first `rotary_dim` features of each head rotated in interleaved pairs (2i, 2i + 1: "
              "rotate-every-two), the rest unrotated")

    def parallel(self, config: Any) -> bool:
        return True


@hookimpl
def register_architectures(register):
    register(GPTJAdapter())
