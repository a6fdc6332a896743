"""The test's own knowledge of every supported family, written from the transformers
sources (``transformers/models/<family>/modeling_<family>.py``), not from the adapters.

For each case: how to build a tiny model, where its blocks and the ends of the residual
stream live, and per canonical component the raw module inside a block plus how to cut
that component out of the module's output (last dimension) or out of its weight. The
tests in ``test_architectures.py`` compare what probescope reports against these tables;
nothing here calls the adapters or their helpers (``Features``, ``Component.take``,
``components()``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import transformers

VOCAB = 100
WIDTH = 32
LAYERS = 2
HEADS = 4
INNER = 64
MAX_POSITIONS = 64
INIT_STD = 0.25  # larger than transformers' 0.02, so every term visibly matters

Slice = Callable[[torch.Tensor], torch.Tensor]  # cuts a component out of the last dimension


def whole(t: torch.Tensor) -> torch.Tensor:
    return t


def span(start: int, stop: int) -> Slice:
    """Features ``[start, stop)`` of the last dimension."""
    return lambda t: t[..., start:stop]


def neox_part(i: int, heads: int, head_dim: int) -> Slice:
    """GPT-NeoX ``query_key_value``: the output is viewed as ``(..., heads, 3 * head_dim)``
    and chunked in three along the last dimension, i.e. ``(..., heads, 3, head_dim)``;
    q, k, v are index 0, 1, 2 of the "3" axis."""

    def cut(t: torch.Tensor) -> torch.Tensor:
        lead = t.shape[:-1]
        return t.reshape(*lead, heads, 3, head_dim)[..., i, :].reshape(*lead, heads * head_dim)

    return cut


@dataclass(frozen=True)
class Part:
    """Where one component lives in a block: module path relative to the block, and how
    to cut the component's features out of the module's output."""

    module: str
    cut: Slice = whole


@dataclass(frozen=True)
class Fused:
    """A fused module and how its components' ``(out, in)`` weights (or biases) stack
    back into it (in ``(out, in)`` orientation)."""

    module: str
    components: tuple[str, ...]
    combine: Callable[[list[torch.Tensor]], torch.Tensor]


def cat_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def neox_interleave(heads: int, head_dim: int) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Rows of q, k, v (each ``heads * head_dim``) back into per-head ``[q_h, k_h, v_h]``."""

    def combine(parts: list[torch.Tensor]) -> torch.Tensor:
        rest = parts[0].shape[1:]
        stacked = torch.stack([p.reshape(heads, head_dim, *rest) for p in parts], dim=1)
        return stacked.reshape(3 * heads * head_dim, *rest)

    return combine


@dataclass(frozen=True)
class Case:
    id: str
    adapter: str  # name of the adapter that must be chosen
    config: Callable[[], object]
    blocks: str  # block list, from the model root
    table: Callable[[object], dict[str, Part]]  # config -> component -> where it lives
    heads: tuple[int, int, int]  # (query heads, key/value heads, head width)
    embed: str  # token embedding module
    final_norm: str | None  # final norm module (None: the model has none)
    lm_head: str = "lm_head"  # output layer; GPT-NeoX named it embed_out before transformers 4.50
    conv1d: bool = False  # weights stored (in, out) (GPT-2's Conv1D)
    parallel: bool = False
    tied: bool = False
    positions: Callable[[torch.nn.Module, int], torch.Tensor] | None = None  # learned positions added before block 0
    project_in: str | None = None
    project_out: str | None = None
    embed_scale: float = 1.0
    softcap: float | None = None
    fused: tuple[Fused, ...] = field(default=())
    seed: int = 0
    attn: str = "self_attn"  # the attention module in a block; returns (output, probabilities)
    # The stream between attention and MLP: the module (in a block) whose input it is;
    # None where attention and MLP run in parallel.
    resid_mid: str | None = None
    # Rotary families: the factor q.k is multiplied by before the softmax (None: no rotary).
    score_scale: Callable[[object], float] | None = None
    score_softcap: float | None = None  # Gemma 2: scores = cap * tanh(scores / cap)


# -- the tables ---------------------------------------------------------------------------


def gpt2_table(config) -> dict[str, Part]:
    # GPT2Attention.forward: self.c_attn(hidden_states).split(self.split_size, dim=2)
    d = config.n_embd
    return {
        "attn.q": Part("attn.c_attn", span(0, d)),
        "attn.k": Part("attn.c_attn", span(d, 2 * d)),
        "attn.v": Part("attn.c_attn", span(2 * d, 3 * d)),
        "attn.o": Part("attn.c_proj"),
        "mlp.up": Part("mlp.c_fc"),
        "mlp.down": Part("mlp.c_proj"),
    }


def neox_table(config) -> dict[str, Part]:
    h, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    return {
        "attn.q": Part("attention.query_key_value", neox_part(0, h, hd)),
        "attn.k": Part("attention.query_key_value", neox_part(1, h, hd)),
        "attn.v": Part("attention.query_key_value", neox_part(2, h, hd)),
        "attn.o": Part("attention.dense"),
        "mlp.up": Part("mlp.dense_h_to_4h"),
        "mlp.down": Part("mlp.dense_4h_to_h"),
    }


def gptj_table(config) -> dict[str, Part]:
    return {
        "attn.q": Part("attn.q_proj"),
        "attn.k": Part("attn.k_proj"),
        "attn.v": Part("attn.v_proj"),
        "attn.o": Part("attn.out_proj"),
        "mlp.up": Part("mlp.fc_in"),
        "mlp.down": Part("mlp.fc_out"),
    }


def phi_table(config) -> dict[str, Part]:
    return {
        "attn.q": Part("self_attn.q_proj"),
        "attn.k": Part("self_attn.k_proj"),
        "attn.v": Part("self_attn.v_proj"),
        "attn.o": Part("self_attn.dense"),
        "mlp.up": Part("mlp.fc1"),
        "mlp.down": Part("mlp.fc2"),
    }


def llama_table(config) -> dict[str, Part]:
    # Llama, Mistral, Qwen2, Gemma, Gemma 2: down_proj(act(gate_proj(x)) * up_proj(x))
    return {
        "attn.q": Part("self_attn.q_proj"),
        "attn.k": Part("self_attn.k_proj"),
        "attn.v": Part("self_attn.v_proj"),
        "attn.o": Part("self_attn.o_proj"),
        "mlp.gate": Part("mlp.gate_proj"),
        "mlp.up": Part("mlp.up_proj"),
        "mlp.down": Part("mlp.down_proj"),
    }


def opt_table(config) -> dict[str, Part]:
    # OPTDecoderLayer: fc1 / fc2 sit on the layer itself, applied to (tokens, width)
    return {
        "attn.q": Part("self_attn.q_proj"),
        "attn.k": Part("self_attn.k_proj"),
        "attn.v": Part("self_attn.v_proj"),
        "attn.o": Part("self_attn.out_proj"),
        "mlp.up": Part("fc1"),
        "mlp.down": Part("fc2"),
    }


def phi3_table(config) -> dict[str, Part]:
    # Phi3Attention: qkv[..., :query_pos], then num_key_value_heads * head_dim for k, rest v;
    # Phi3MLP: gate, up_states = gate_up_proj(x).chunk(2, dim=-1)
    hd = config.hidden_size // config.num_attention_heads
    q = config.num_attention_heads * hd
    kv = config.num_key_value_heads * hd
    inner = config.intermediate_size
    return {
        "attn.q": Part("self_attn.qkv_proj", span(0, q)),
        "attn.k": Part("self_attn.qkv_proj", span(q, q + kv)),
        "attn.v": Part("self_attn.qkv_proj", span(q + kv, q + 2 * kv)),
        "attn.o": Part("self_attn.o_proj"),
        "mlp.gate": Part("mlp.gate_up_proj", span(0, inner)),
        "mlp.up": Part("mlp.gate_up_proj", span(inner, 2 * inner)),
        "mlp.down": Part("mlp.down_proj"),
    }


def head_dim_scale(config) -> float:
    # LlamaAttention and kin: self.scaling = self.head_dim ** -0.5
    return (getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads) ** -0.5


def gemma2_scale(config) -> float:
    # Gemma2Attention: self.scaling = config.query_pre_attn_scalar ** -0.5
    return config.query_pre_attn_scalar ** -0.5


def gpt2_positions(model, n: int) -> torch.Tensor:
    return model.transformer.wpe.weight[torch.arange(n)]


def opt_positions(model, n: int) -> torch.Tensor:
    # OPTLearnedPositionalEmbedding: cumsum(mask) * mask - 1, plus an offset of 2
    return model.model.decoder.embed_positions.weight[torch.arange(n) + 2]


# -- the cases ----------------------------------------------------------------------------

T = transformers
LLAMA_LIKE = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=INNER, max_position_embeddings=MAX_POSITIONS, bos_token_id=0, eos_token_id=0,
    pad_token_id=0,
)
GPT2_LIKE = dict(
    vocab_size=VOCAB, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS, n_positions=MAX_POSITIONS,
    bos_token_id=0, eos_token_id=0,
)
OPT_LIKE = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    ffn_dim=INNER, max_position_embeddings=MAX_POSITIONS, pad_token_id=1, bos_token_id=0, eos_token_id=0,
)
NEOX_LIKE = dict(
    vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
    intermediate_size=INNER, max_position_embeddings=MAX_POSITIONS, bos_token_id=0, eos_token_id=0,
)
HD = WIDTH // HEADS

CASES: list[Case] = [
    Case(
        "gpt2", "gpt2", lambda: T.GPT2Config(**GPT2_LIKE), "transformer.h", gpt2_table,
        (HEADS, HEADS, HD), "transformer.wte", "transformer.ln_f", conv1d=True, tied=True,
        positions=gpt2_positions, attn="attn", resid_mid="ln_2",
        fused=(Fused("attn.c_attn", ("attn.q", "attn.k", "attn.v"), cat_rows),),
    ),
    Case(
        "gpt2-untied", "gpt2", lambda: T.GPT2Config(**GPT2_LIKE, tie_word_embeddings=False), "transformer.h",
        gpt2_table, (HEADS, HEADS, HD), "transformer.wte", "transformer.ln_f", conv1d=True, tied=False,
        positions=gpt2_positions, seed=1, attn="attn", resid_mid="ln_2",
        fused=(Fused("attn.c_attn", ("attn.q", "attn.k", "attn.v"), cat_rows),),
    ),
    Case(
        "gpt_neox-parallel", "gpt_neox", lambda: T.GPTNeoXConfig(**NEOX_LIKE, use_parallel_residual=True),
        "gpt_neox.layers", neox_table, (HEADS, HEADS, HD), "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
        parallel=True, seed=2, attn="attention", score_scale=head_dim_scale,
        fused=(Fused("attention.query_key_value", ("attn.q", "attn.k", "attn.v"), neox_interleave(HEADS, HD)),),
    ),
    Case(
        "gpt_neox-sequential", "gpt_neox", lambda: T.GPTNeoXConfig(**NEOX_LIKE, use_parallel_residual=False),
        "gpt_neox.layers", neox_table, (HEADS, HEADS, HD), "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
        parallel=False, seed=3, attn="attention", resid_mid="post_attention_layernorm",
        score_scale=head_dim_scale,
        fused=(Fused("attention.query_key_value", ("attn.q", "attn.k", "attn.v"), neox_interleave(HEADS, HD)),),
    ),
    Case(
        "phi", "phi", lambda: T.PhiConfig(**LLAMA_LIKE), "model.layers", phi_table, (HEADS, HEADS, HD),
        "model.embed_tokens", "model.final_layernorm", parallel=True, seed=4, score_scale=head_dim_scale,
    ),
    Case(
        "llama", "llama", lambda: T.LlamaConfig(**LLAMA_LIKE, num_key_value_heads=2), "model.layers",
        llama_table, (HEADS, 2, HD), "model.embed_tokens", "model.norm", seed=5,
        resid_mid="post_attention_layernorm", score_scale=head_dim_scale,
    ),
    Case(
        "mistral", "mistral", lambda: T.MistralConfig(**LLAMA_LIKE, num_key_value_heads=2), "model.layers",
        llama_table, (HEADS, 2, HD), "model.embed_tokens", "model.norm", seed=6,
        resid_mid="post_attention_layernorm", score_scale=head_dim_scale,
    ),
    Case(
        "qwen2", "qwen2", lambda: T.Qwen2Config(**LLAMA_LIKE, num_key_value_heads=2), "model.layers",
        llama_table, (HEADS, 2, HD), "model.embed_tokens", "model.norm", seed=7,
        resid_mid="post_attention_layernorm", score_scale=head_dim_scale,
    ),
    Case(
        "gemma", "gemma", lambda: T.GemmaConfig(**LLAMA_LIKE, num_key_value_heads=1, head_dim=16),
        "model.layers", llama_table, (HEADS, 1, 16), "model.embed_tokens", "model.norm", tied=True,
        embed_scale=WIDTH ** 0.5, seed=8, resid_mid="post_attention_layernorm", score_scale=head_dim_scale,
    ),
    Case(
        "gemma2", "gemma2",
        lambda: T.Gemma2Config(**LLAMA_LIKE, num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                               attn_logit_softcapping=2.0),
        "model.layers", llama_table, (HEADS, 2, 16), "model.embed_tokens", "model.norm", tied=True,
        embed_scale=WIDTH ** 0.5, softcap=3.0, seed=9,
        # Gemma2DecoderLayer: residual + post_attention_layernorm(attn); then pre_feedforward_layernorm
        resid_mid="pre_feedforward_layernorm", score_scale=gemma2_scale, score_softcap=2.0,
    ),
    Case(
        "gptj", "gptj", lambda: T.GPTJConfig(**GPT2_LIKE, rotary_dim=4), "transformer.h", gptj_table,
        (HEADS, HEADS, HD), "transformer.wte", "transformer.ln_f", parallel=True, seed=10, attn="attn",
        score_scale=lambda config: (config.n_embd // config.n_head) ** -0.5,  # GPTJAttention: / sqrt(head_dim)
    ),
    Case(
        "opt", "opt", lambda: T.OPTConfig(**OPT_LIKE), "model.decoder.layers", opt_table, (HEADS, HEADS, HD),
        "model.decoder.embed_tokens", "model.decoder.final_layer_norm", tied=True, positions=opt_positions,
        seed=11, resid_mid="final_layer_norm",  # OPTDecoderLayer: residual + attn, then final_layer_norm (pre-norm)
    ),
    Case(
        "opt-350m-like", "opt",
        lambda: T.OPTConfig(**OPT_LIKE, word_embed_proj_dim=16, do_layer_norm_before=False),
        "model.decoder.layers", opt_table, (HEADS, HEADS, HD), "model.decoder.embed_tokens", None, tied=True,
        positions=opt_positions, project_in="model.decoder.project_in", project_out="model.decoder.project_out",
        seed=12, resid_mid="fc1",  # post-norm: self_attn_layer_norm(residual + attn) goes straight to fc1
    ),
    Case(
        "phi3", "phi3", lambda: T.Phi3Config(**LLAMA_LIKE, num_key_value_heads=2), "model.layers", phi3_table,
        (HEADS, 2, HD), "model.embed_tokens", "model.norm", seed=13,
        resid_mid="post_attention_layernorm", score_scale=head_dim_scale,
        fused=(
            Fused("self_attn.qkv_proj", ("attn.q", "attn.k", "attn.v"), cat_rows),
            Fused("mlp.gate_up_proj", ("mlp.gate", "mlp.up"), cat_rows),
        ),
    ),
]

BY_ID = {case.id: case for case in CASES}


@functools.lru_cache(maxsize=None)
def build(case_id: str) -> torch.nn.Module:
    """The case's model, built once: random weights with every parameter (norms and
    biases too) drawn from N(0, INIT_STD^2), in eval mode."""
    case = BY_ID[case_id]
    torch.manual_seed(case.seed)
    model = transformers.AutoModelForCausalLM.from_config(case.config()).eval()
    with torch.no_grad():
        for param in model.parameters():  # tied parameters are listed (and drawn) once
            param.normal_(0.0, INIT_STD)
    return model


def stored_to_out_in(case: Case, weight: torch.Tensor) -> torch.Tensor:
    """A raw weight as ``(out, in)``: Conv1D keeps ``(in, out)``, nn.Linear ``(out, in)``."""
    return weight.t() if case.conv1d else weight
