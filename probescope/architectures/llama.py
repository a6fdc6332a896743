"""Llama: blocks at ``model.layers``; pre-norm decoder layers with rotary positions."""

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class LlamaAdapter(ArchitectureAdapter):
    name = "llama"
    model_types = ("llama",)
    block_paths = ("model.layers", "layers")
    description = "Llama (LlamaForCausalLM, LlamaModel)"


@hookimpl
def register_architectures(register):
    register(LlamaAdapter())
