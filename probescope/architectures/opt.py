"""OPT: blocks at ``model.decoder.layers``; the MLP's ``fc1`` and ``fc2`` sit directly on
the block (there is no ``mlp`` module) and work on tokens flattened to ``(tokens, d)``;
OPT-350m embeds in a narrower space, projected in and out, and normalises after each
sublayer, so it has no final norm."""

from typing import Any

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class OPTAdapter(ArchitectureAdapter):
    name = "opt"
    model_types = ("opt",)
    block_paths = ("model.decoder.layers", "decoder.layers")
    description = "OPT (OPTForCausalLM, OPTModel)"
    component_modules = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.out_proj",
        "mlp.up": "fc1",
        "mlp.down": "fc2",
    }
    final_norm_path = "final_layer_norm"
    project_in_path = "project_in"
    project_out_path = "project_out"

    def mlp_output(self, block: Any, x: Any, config: Any) -> Any:
        """`fc2(activation_fn(fc1(final_layer_norm(x))))`, all on the block (no MLP module); post-norm OPT-350m has no norm in front"""
        # No MLP module: fc1, the activation and fc2 sit on the block. Pre-norm OPT puts
        # final_layer_norm in front of them; post-norm OPT-350m normalises after the sum.
        if getattr(config, "do_layer_norm_before", True):
            x = block.final_layer_norm(x)
        return block.fc2(block.activation_fn(block.fc1(x)))


@hookimpl
def register_architectures(register):
    register(OPTAdapter())
