"""Shared fixtures: tiny models built from config with a locally trained tokenizer.

Nothing here touches the network: HF_HUB_OFFLINE makes an accidental hub call fail at
once instead of retrying.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from probescope import demo  # noqa: E402

PROMPTS = [
    "When Mary and John went to the store, John gave a drink to",
    "The cat sat on the mat.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return demo.build_tokenizer()


@pytest.fixture(scope="session")
def gpt2(tokenizer):
    return demo.build_gpt2(tokenizer, n_layer=3, n_embd=32, n_head=4, seed=1)


@pytest.fixture(scope="session")
def llama(tokenizer):
    return demo.build_llama(tokenizer, layers=3, width=32, heads=4, kv_heads=2, seed=2)


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory, tokenizer):
    """Model folders saved with save_pretrained: ``{"gpt2": Path, "llama": Path}``.

    Built from separate model objects, so wrapping the folders' models in nnsight never
    touches the in-memory fixtures above.
    """
    root = tmp_path_factory.mktemp("models")
    return {
        "gpt2": demo.save_model(demo.build_gpt2(tokenizer, n_layer=3, n_embd=32, n_head=4, seed=1), tokenizer, root / "gpt2"),
        "llama": demo.save_model(demo.build_llama(tokenizer, layers=3, width=32, heads=4, kv_heads=2, seed=2), tokenizer, root / "llama"),
    }


def toml_list(items) -> str:
    return "[" + ", ".join(f'"{x}"' if isinstance(x, str) else str(x) for x in items) + "]"


@pytest.fixture
def write_config(tmp_path):
    """Write a TOML config into ``tmp_path`` and return its path."""

    def write(text: str, name: str = "probes.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


def basic_config(model_dir: Path, *, layers="[0, -1]", extra: str = "", renderer: bool = True) -> str:
    """A valid config for one model folder; tests break one thing at a time."""
    text = f"""
[[models]]
name = "tiny"
path = "{model_dir}"

[inputs]
prompts = {toml_list(PROMPTS)}
batch_size = 2

[[probes]]
use = "token_similarity"
layers = {layers}
"""
    if renderer:
        text += """
[[renderers]]
use = "similarity_grid"
output = "similarity.png"
"""
    return text + """
[output]
dir = "out"
""" + extra


@pytest.fixture
def install_plugin(tmp_path, monkeypatch):
    """Install a third-party plugin the way pip would: a module plus a ``.dist-info``
    folder declaring it in the ``probescope`` entry-point group, on ``sys.path``.

    ``install_plugin(package, {entry_name: module_source})`` returns the site folder.
    """
    import importlib
    import sys

    site = tmp_path / "site-packages"
    site.mkdir(exist_ok=True)
    monkeypatch.syspath_prepend(str(site))

    def install(package: str, modules: dict[str, str], version: str = "1.0") -> Path:
        info = site / f"{package}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        lines = ["[probescope]"]
        for entry, source in modules.items():
            module = f"{package.replace('-', '_')}_{entry}"
            (site / f"{module}.py").write_text(source)
            lines.append(f"{entry} = {module}")
            monkeypatch.delitem(sys.modules, module, raising=False)
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
        importlib.invalidate_caches()
        return site

    return install
