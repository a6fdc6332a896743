"""GPT-2: blocks at ``transformer.h``; the residual stream entering block 0 is token plus position embeddings."""

from probescope.architectures.base import ArchitectureAdapter
from probescope.plugins import hookimpl


class GPT2Adapter(ArchitectureAdapter):
    name = "gpt2"
    model_types = ("gpt2",)
    block_paths = ("transformer.h", "h")
    description = "GPT-2 (GPT2LMHeadModel, GPT2Model)"


@hookimpl
def register_architectures(register):
    register(GPT2Adapter())
