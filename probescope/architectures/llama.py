"""Llama and the families sharing its layout (Mistral, Qwen2): blocks at
``model.layers``; pre-norm; separate query, key and value projections with grouped-query
attention; a gated MLP whose gate runs before its up projection."""

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama",)
    block_paths = ("model.layers", "layers")
    description = "Llama 1, 2, 3 (LlamaForCausalLM, LlamaModel)"
    component_modules = {
        "attn.q": "self_attn.q_proj",
        "attn.k": "self_attn.k_proj",
        "attn.v": "self_attn.v_proj",
        "attn.o": "self_attn.o_proj",
        "mlp.gate": "mlp.gate_proj",  # down_proj(act(gate_proj(x)) * up_proj(x)): gate runs first
        "mlp.up": "mlp.up_proj",
        "mlp.down": "mlp.down_proj",
    }
    final_norm_path = "norm"
    mlp_path = "mlp"
    mlp_norm_path = "post_attention_layernorm"  # the norm in front of the MLP, despite its name
    attention_path = "self_attn"
    scores_call = ("attention_interface_1", 1)  # attention_interface(self, query, key, value, mask, ...)
    rotary = "every feature of each head rotated (rotate-half: feature i pairs with i + head_dim/2)"


class MistralAdapter(LlamaAdapter):
    name = "mistral"
    model_types = ("mistral",)
    description = "Mistral (MistralForCausalLM, MistralModel)"


class Qwen2Adapter(LlamaAdapter):
    name = "qwen2"
    model_types = ("qwen2",)
    description = "Qwen2, Qwen2.5 (Qwen2ForCausalLM, Qwen2Model); biases on q, k, v"


class Qwen2VLAdapter(Qwen2Adapter):
    name = "qwen2_vl"
    model_types = ("qwen2_vl_text", "qwen2_5_vl_text")
    description = ("the text decoder of Qwen2-VL and Qwen2.5-VL (Qwen2VLTextModel): Qwen2's layout, "
                   "rotary positions in three sections (time, height, width)")


@hookimpl
def register_architectures(register):
    register(LlamaAdapter())
    register(MistralAdapter())
    register(Qwen2Adapter())
    register(Qwen2VLAdapter())
