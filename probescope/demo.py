"""The offline demo: two small GPT-2-shaped models of different sizes, built from config
with a tokenizer trained here, saved as ordinary model folders, then probed through a
config file exactly as a user's models would be.

The same builders serve the test suite, so nothing ever downloads weights or tokenizers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEMO_CORPUS = """\
The quick brown fox jumps over the lazy dog. A bird in the hand is worth two in the bush.
Paris is the capital of France, and Rome is the capital of Italy. The cat sat on the mat.
Researchers look inside language models to see how tokens become alike with depth.
When Mary and John went to the store, John gave a drink to Mary. One, two, three, four.
The model reads every token, mixes them in attention, and writes to the residual stream.
"""

DEMO_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEMO_SIZES = {"small": dict(n_layer=4, n_embd=64, n_head=4), "medium": dict(n_layer=8, n_embd=128, n_head=8)}


def build_tokenizer(corpus: str = DEMO_CORPUS, vocab_size: int = 400) -> Any:
    """A byte-level BPE tokenizer trained on ``corpus``, as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(corpus.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
        unk_token="<|endoftext|>", model_max_length=1024,
    )


def build_gpt2(tokenizer: Any, *, n_layer: int, n_embd: int, n_head: int, n_positions: int = 128, seed: int = 0) -> Any:
    """A randomly initialised GPT-2 with the tokenizer's vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    eos = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
        n_head=n_head, bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def build_llama(tokenizer: Any, *, layers: int = 3, width: int = 64, heads: int = 4, kv_heads: int = 2,
                max_positions: int = 128, seed: int = 0) -> Any:
    """A randomly initialised Llama (grouped-query attention) with the tokenizer's vocabulary."""
    from transformers import LlamaConfig, LlamaForCausalLM

    eos = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=width, intermediate_size=2 * width,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, bos_token_id=eos, eos_token_id=eos,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def save_model(model: Any, tokenizer: Any, folder: Path) -> Path:
    """Save as a model folder ``from_pretrained`` reads (safetensors weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def demo_config(models_dir: str = "models") -> str:
    """The demo's TOML configuration, paths relative to the folder it is written to."""
    models = "\n".join(
        f'[[models]]\nname = "{name}"\npath = "{models_dir}/{name}"\n' for name in DEMO_SIZES
    )
    return f"""\
# probescope demo: two randomly initialised GPT-2-shaped models of different depth.
# Both probes read their activations in one traced pass per batch.
{models}
[inputs]
prompts = ["{DEMO_PROMPT}", "The quick brown fox jumps over the lazy dog."]

[[probes]]
use = "token_similarity"
layers = ["embed", 0, 1, -1]

[[probes]]
use = "component_norm"
statistic = "activation_norm"
divide_by_sqrt_width = true

[[renderers]]
use = "similarity_grid"
output = "token_similarity.png"

[[renderers]]
use = "component_heatmap"
output = "component_norm.png"

[output]
dir = "results"
"""


def write_demo(folder: Path) -> Path:
    """Build the demo models and config under ``folder``; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    for seed, (name, size) in enumerate(DEMO_SIZES.items()):
        target = folder / "models" / name
        if not (target / "config.json").is_file():
            save_model(build_gpt2(tokenizer, seed=seed, **size), tokenizer, target)
    config = folder / "demo.toml"
    config.write_text(demo_config())
    return config
