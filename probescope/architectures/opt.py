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
    attention_path = "self_attn"
    rotary = "no rotary position embedding: learned absolute positions; `attn.q` is multiplied by head_dim^-1/2 before the scores"

    def resid_mid_port(self, config: Any) -> tuple[str, str]:
        """`final_layer_norm` input (pre-norm; tokens flattened); post-norm OPT-350m: `fc1` input"""
        # Pre-norm: the stream enters the block's final_layer_norm in front of fc1.
        # Post-norm OPT-350m: self_attn_layer_norm(x + attention) goes to fc1 as it is.
        if getattr(config, "do_layer_norm_before", True):
            return "final_layer_norm", "input"
        return "fc1", "input"

    def final_stream_path(self, config: Any) -> str | None:
        """`project_out` output where the config projects (OPT-350m), else `final_layer_norm` output"""
        if getattr(config, "word_embed_proj_dim", None) not in (None, self.hidden_size(config)):
            return self.project_out_path
        if getattr(config, "do_layer_norm_before", True) and not getattr(config, "_remove_final_layer_norm", False):
            return self.final_norm_path
        return None

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
