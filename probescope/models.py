"""Loading models and tokenizers, and matching them with an architecture adapter.

Loading happens in two steps so that mistakes surface before any weights are read:
:func:`inspect` reads only the model's config (layer count, architecture, longest input),
then :func:`load` reads the weights. Weights come from safetensors files unless the user
allows pickled checkpoints, and ``trust_remote_code`` stays off unless turned on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from probescope.architectures.base import ArchitectureAdapter, BlockListAdapter
from probescope.errors import ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from probescope.architectures.layout import ModelLayout
    from probescope.config import ModelEntry

DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def _dtype_kwarg() -> str:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@dataclass
class ModelInfo:
    """What is known about a model before its weights load."""

    name: str
    source: str  # local folder, hub id, or "<in memory: ClassName>"
    revision: str | None
    config: Any  # transformers PretrainedConfig
    adapter: ArchitectureAdapter
    num_layers: int
    max_positions: int | None
    dtype: str


@dataclass
class LoadedModel:
    """A model ready to be traced: the transformers model, its tokenizer and its layout."""

    info: ModelInfo
    model: torch.nn.Module
    tokenizer: Any
    blocks: str  # dotted path of the block list

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def layout(self) -> "ModelLayout":
        """Weights by canonical name (component weights, per-head weights, embedding,
        unembedding, final norm)."""
        from probescope.architectures.layout import ModelLayout

        return ModelLayout(self.model, self.info.adapter, self.blocks)


def find_adapter(
    config: Any, registry: Any, *, architecture: str | None = None, blocks: str | None = None
) -> ArchitectureAdapter:
    """The adapter for a model: the one named, else the one whose ``model_types`` match,
    else a residual-stream-only adapter when the user named the block list.

    :param registry: the plugin registry (:class:`probescope.plugins.manager.Registry`),
        not imported here: the registry's contract imports this module's ``ModelInfo``.
    """
    if architecture is not None:
        return registry.get("architecture", architecture)
    for adapter in registry.all("architecture"):
        if adapter.handles(config):
            return adapter
    if blocks is not None:
        return BlockListAdapter(blocks)
    supported = ", ".join(
        f"{a.name} ({', '.join(a.model_types)})" for a in registry.all("architecture")
    )
    raise UnsupportedArchitectureError(
        f"no architecture adapter handles model_type {getattr(config, 'model_type', None)!r}; "
        f"supported: {supported}. For probes that read only the residual stream, name the "
        f"block list in the model's config entry, e.g. blocks = \"model.layers\""
    )


def _source(entry: "ModelEntry") -> str:
    return str(entry.path) if entry.path is not None else str(entry.hub)


def _hub_kwargs(entry: "ModelEntry") -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": entry.trust_remote_code}
    if entry.revision is not None:
        kwargs["revision"] = entry.revision
    return kwargs


def read_config(entry: "ModelEntry") -> Any:
    """The transformers config of a model entry (no weights are read)."""
    from transformers import AutoConfig

    source = _source(entry)
    try:
        return AutoConfig.from_pretrained(source, **_hub_kwargs(entry))
    except Exception as exc:
        raise ModelLoadError(f"model {entry.name!r}: cannot read the config of {source!r}: {exc}") from exc


def inspect(entry: "ModelEntry", registry: Any) -> ModelInfo:
    """Read a model's config (no weights) and find its adapter."""
    source = _source(entry)
    config = read_config(entry)
    adapter = find_adapter(config, registry, architecture=entry.architecture, blocks=entry.blocks)
    return ModelInfo(
        name=entry.name,
        source=source,
        revision=entry.revision or getattr(config, "_commit_hash", None),
        config=config,
        adapter=adapter,
        num_layers=adapter.num_layers(config),
        max_positions=adapter.max_positions(config),
        dtype=entry.dtype,
    )


def check_layout(entry: "ModelEntry", info: ModelInfo, registry: Any) -> None:
    """Build the model's skeleton on the meta device (no memory, no weights) and check
    that its adapter finds the block list, so a wrong ``architecture`` or ``blocks``
    is caught before any weights load."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(info.config, trust_remote_code=entry.trust_remote_code)
    except Exception:  # a model class that cannot be built this way is checked at load time
        return
    try:
        info.adapter.blocks(skeleton)
    except UnsupportedArchitectureError as exc:
        key = "blocks" if entry.blocks is not None and entry.architecture is None else "architecture"
        model_type = getattr(info.config, "model_type", None)
        fitting = [a.name for a in registry.all("architecture") if a.handles(info.config)]
        hint = f"; adapter {fitting[0]!r} handles it" if fitting else ""
        raise ModelLoadError(f"{exc}; this model's model_type is {model_type!r}{hint}", key=key) from None


def unavailable_device(device: str) -> str | None:
    """Why a torch device cannot be used here, or None when it can."""
    kind = torch.device(device)
    if kind.type == "cuda":
        if not torch.cuda.is_available():
            return f"device {device!r} asked for, but CUDA is not available on this machine"
        if kind.index is not None and kind.index >= torch.cuda.device_count():
            return f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)"
    if kind.type == "mps" and not torch.backends.mps.is_available():
        return f"device {device!r} asked for, but MPS is not available on this machine"
    return None


def load_tokenizer(entry: "ModelEntry") -> Any:
    from transformers import AutoTokenizer

    source = _source(entry)
    try:
        return AutoTokenizer.from_pretrained(source, **_hub_kwargs(entry))
    except Exception as exc:
        raise ModelLoadError(f"model {entry.name!r}: cannot load the tokenizer of {source!r}: {exc}") from exc


def load_weights(entry: "ModelEntry") -> torch.nn.Module:
    """The model of an entry with its weights, on its device, in eval mode: safetensors
    only unless the entry allows pickles, remote code only when it allows it."""
    from transformers import AutoModelForCausalLM

    source = _source(entry)
    kwargs = _hub_kwargs(entry)
    kwargs["use_safetensors"] = entry.use_safetensors
    kwargs[_dtype_kwarg()] = "auto" if entry.dtype == "auto" else DTYPES[entry.dtype]
    if entry.device_map is not None:
        kwargs["device_map"] = entry.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        hint = ""
        if entry.use_safetensors and "safetensors" in str(exc).lower():
            hint = " (only safetensors weights load unless the model entry sets use_safetensors = false)"
        raise ModelLoadError(f"model {entry.name!r}: cannot load weights from {source!r}: {exc}{hint}") from exc
    if entry.device_map is None:
        try:
            model = model.to(entry.device)
        except Exception as exc:
            raise ModelLoadError(f"model {entry.name!r}: cannot move it to device {entry.device!r}: {exc}") from exc
    return model.eval()


def load(entry: "ModelEntry", info: ModelInfo, tokenizer: Any) -> LoadedModel:
    """Load the weights of a model that :func:`inspect` accepted."""
    model = load_weights(entry)
    if entry.dtype == "auto":
        info.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return LoadedModel(info, model, tokenizer, info.adapter.blocks(model))


def from_objects(
    name: str, model: torch.nn.Module, tokenizer: Any, registry: Any, *,
    architecture: str | None = None, blocks: str | None = None,
) -> LoadedModel:
    """Wrap a model the caller already built (Python API)."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelLoadError(f"model {name!r}: {type(model).__name__} has no transformers config")
    adapter = find_adapter(config, registry, architecture=architecture, blocks=blocks)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = ModelInfo(
        name=name,
        source=getattr(config, "_name_or_path", "") or f"<in memory: {type(model).__name__}>",
        revision=getattr(config, "_commit_hash", None),
        config=config,
        adapter=adapter,
        num_layers=adapter.num_layers(config),
        max_positions=adapter.max_positions(config),
        dtype=dtype,
    )
    return LoadedModel(info, model.eval(), tokenizer, adapter.blocks(model))


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()
