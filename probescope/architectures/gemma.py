"""Gemma and Gemma 2: Llama's layout, with token embeddings scaled by sqrt(d_model) and
explicit head widths. Gemma 2 adds norms around attention and MLP, and soft caps on
attention scores and final logits."""

from typing import Any

from probescope.architectures.llama import LlamaAdapter
from probescope.plugins import hookimpl


class GemmaAdapter(LlamaAdapter):
    name = "gemma"
    model_types = ("gemma",)
    description = "Gemma (GemmaForCausalLM, GemmaModel); embeddings scaled by sqrt(d)"

    def embedding_scale(self, config: Any) -> float:
        return float(self.hidden_size(config)) ** 0.5


class Gemma2Adapter(GemmaAdapter):
    name = "gemma2"
    model_types = ("gemma2",)
    description = "Gemma 2 (Gemma2ForCausalLM, Gemma2Model); embeddings scaled by sqrt(d), logit soft cap"
    mlp_norm_path = "pre_feedforward_layernorm"
    rotary = ("every feature of each head rotated (rotate-half); the scores are q.k times "
              "query_pre_attn_scalar^-1/2, soft-capped by attn_logit_softcapping")

    def mlp_output(self, block: Any, x: Any, config: Any) -> Any:
        """then `post_feedforward_layernorm` on its output"""
        # Gemma 2 normalises the MLP's output too before adding it to the stream.
        return block.post_feedforward_layernorm(super().mlp_output(block, x, config))


@hookimpl
def register_architectures(register):
    register(GemmaAdapter())
    register(Gemma2Adapter())
