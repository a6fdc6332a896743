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

from probescope.architectures.base import ArchitectureAdapter, BlockListAdapter, config_value, get_submodule
from probescope.errors import ModelLoadError, UnsupportedArchitectureError
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")


if TYPE_CHECKING:
    from probescope.architectures.layout import ModelLayout
    from probescope.config import ModelEntry

def torch_dtype(name: str) -> torch.dtype | None:
    """The torch dtype a model entry's ``dtype`` names (validated by the config); None for
    ``auto``, the checkpoint's own."""
    return None if name == "auto" else getattr(torch, name)


def _dtype_kwarg() -> str:
    """``from_pretrained`` takes ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


@dataclass(frozen=True)
class VisionLanguage:
    """What sets a vision-language model apart (its config has a ``vision_config``)."""

    config: Any  # the whole model's config; ModelInfo.config is its text decoder's
    image_token_id: int | None
    #: the leading image and prompt tokens attend to each other both ways (PaliGemma)
    bidirectional_prefix: bool

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", ""))


#: Vision-language families whose image and prompt tokens form a bidirectional prefix.
_BIDIRECTIONAL_PREFIX = ("paligemma",)


def vision_language(config: Any) -> VisionLanguage | None:
    """The vision-language facts of a model config, or None for a text-only model."""
    if getattr(config, "vision_config", None) is None:
        return None
    image_token_id = config_value(config, "image_token_id", "image_token_index")
    return VisionLanguage(config, int(image_token_id) if image_token_id is not None else None,
                          getattr(config, "model_type", None) in _BIDIRECTIONAL_PREFIX)


def text_config(config: Any) -> Any:
    """The config of a model's text decoder: the config itself for a text-only model,
    ``config.get_text_config()`` for a vision-language one."""
    if getattr(config, "vision_config", None) is not None and hasattr(config, "get_text_config"):
        return config.get_text_config()
    return config


@dataclass
class ModelInfo:
    """What is known about a model before its weights load."""

    name: str
    source: str  # local folder, hub id, or "<in memory: ClassName>"
    revision: str | None
    config: Any  # transformers PretrainedConfig of the text decoder, which the adapter reads
    adapter: ArchitectureAdapter
    num_layers: int
    max_positions: int | None
    dtype: str
    vision: VisionLanguage | None = None  # set for a vision-language model


@dataclass
class LoadedModel:
    """A model ready to be traced: the transformers model, its tokenizer and its layout."""

    info: ModelInfo
    model: torch.nn.Module
    tokenizer: Any
    blocks: str  # dotted path of the block list
    processor: Any = None  # a vision-language model's processor (its tokenizer is `tokenizer`)
    #: where the trace plan runs: here (False), on NDIF (True: ``model`` is the skeleton on
    #: the meta device, no weights here), or in nnsight's local simulation of NDIF ("local")
    remote: bool | str = False
    entry: Any = None  # the ModelEntry it was loaded from (None: a model given as an object)
    #: builds the layout when the weights are not here (a model on NDIF): it streams them
    streamed: Any = None

    @property
    def name(self) -> str:
        return self.info.name

    # What a probe's ``check`` reads off ModelInfo, here too, for its ``reads``.
    @property
    def num_layers(self) -> int:
        return self.info.num_layers

    @property
    def config(self) -> Any:
        return self.info.config

    @property
    def adapter(self) -> ArchitectureAdapter:
        return self.info.adapter

    @property
    def device(self) -> torch.device:
        """Where the model takes its inputs (a dispatched model's execution device)."""
        from probescope.offload import execution_device

        if self.remote is True:  # inputs travel with the request from here
            return torch.device("cpu")
        return execution_device(self.model)

    @property
    def layout(self) -> "ModelLayout":
        """Weights by canonical name (component weights, per-head weights, embedding,
        unembedding, final norm); for a model accelerate dispatched, offloaded weights
        are read from its offload store instead of coming back as meta tensors; for a
        model on NDIF they are streamed from its checkpoint's safetensors files."""
        from probescope.architectures.layout import ModelLayout
        from probescope.offload import OffloadedLayout, is_dispatched

        if self.streamed is not None:
            if "_streamed_layout" not in self.__dict__:  # built once: it holds what it has read
                self.__dict__["_streamed_layout"] = self.streamed()
            return self.__dict__["_streamed_layout"]

        kind = OffloadedLayout if is_dispatched(self.model) else ModelLayout
        return kind(self.model, self.info.adapter, self.blocks)


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
    """Read a model's config (no weights) and find its adapter (for a vision-language
    model, its text decoder's family adapter)."""
    source = _source(entry)
    config = read_config(entry)
    text = text_config(config)
    adapter = find_adapter(text, registry, architecture=entry.architecture, blocks=entry.blocks)
    return ModelInfo(
        name=entry.name,
        source=source,
        revision=entry.revision or getattr(config, "_commit_hash", None),
        config=text,
        adapter=adapter,
        num_layers=adapter.num_layers(text),
        max_positions=adapter.max_positions(text),
        dtype=entry.dtype,
        vision=vision_language(config),
    )


def auto_class(vision: bool) -> Any:
    """The transformers auto class that builds a model: image-text-to-text for a
    vision-language model, causal LM otherwise."""
    import transformers

    return transformers.AutoModelForImageTextToText if vision else transformers.AutoModelForCausalLM


def skeleton(config: Any, trust_remote_code: bool = False) -> torch.nn.Module:
    """The model of ``config`` on the meta device (``*ForCausalLM``, or the
    image-text-to-text model of a vision-language config): every module and parameter
    shape, no memory, no weights."""
    with torch.device("meta"):
        return auto_class(vision_language(config) is not None).from_config(config, trust_remote_code=trust_remote_code)


def find_blocks(model: torch.nn.Module, adapter: ArchitectureAdapter) -> str:
    """Dotted path of the block list: where the adapter finds it, or, in a
    vision-language model, inside its text decoder (``model.language_model.layers``)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if getattr(getattr(model, "config", None), "vision_config", None) is not None and decoder is not None:
        path = next((name for name, module in model.named_modules() if module is decoder), None)
        try:
            inner = adapter.blocks(decoder) if path else None
        except UnsupportedArchitectureError:  # a block path the user named from the root
            inner = None
        if inner is not None:
            return f"{path}.{inner}"
    return adapter.blocks(model)


def check_layout(entry: "ModelEntry", info: ModelInfo, registry: Any) -> None:
    """Build the model's skeleton on the meta device (no memory, no weights) and check
    that its adapter finds the block list, so a wrong ``architecture`` or ``blocks``
    (or a ``device_map`` table naming a module the model lacks) is caught before any
    weights load."""
    config = info.vision.config if info.vision else info.config
    try:
        model = skeleton(config, entry.trust_remote_code)
    except Exception:  # a model class that cannot be built this way is checked at load time
        return
    try:
        blocks = find_blocks(model, info.adapter)
    except UnsupportedArchitectureError as exc:
        key = "blocks" if entry.blocks is not None and entry.architecture is None else "architecture"
        model_type = getattr(info.config, "model_type", None)
        fitting = [a.name for a in registry.all("architecture") if a.handles(info.config)]
        hint = f"; adapter {fitting[0]!r} handles it" if fitting else ""
        raise ModelLoadError(f"{exc}; this model's model_type is {model_type!r}{hint}", key=key) from None
    from probescope.offload import unknown_modules

    unknown = unknown_modules(model, entry.device_map)
    if unknown:
        raise ModelLoadError(f"device_map names module(s) the model does not have: {', '.join(map(repr, unknown))} "
                             f"(its blocks are {blocks}.0, {blocks}.1, ...)", key="device_map")


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


def load_processor(entry: "ModelEntry") -> Any:
    """A vision-language model's processor (tokenizer, image processor, chat template).

    Processors that also carry a video processor (Qwen2-VL, SmolVLM) need torchvision
    for it; without torchvision they are built without one, which serves images.
    """
    from transformers import AutoProcessor
    from transformers.utils import is_torchvision_available

    source = _source(entry)
    kwargs = _hub_kwargs(entry)
    try:
        return AutoProcessor.from_pretrained(source, **kwargs)
    except Exception as exc:
        if is_torchvision_available():
            raise ModelLoadError(f"model {entry.name!r}: cannot load the processor of {source!r}: {exc}") from exc
        try:  # its video processor needs torchvision: build it without one
            return images_only_processor(read_config(entry)).from_pretrained(source, **kwargs)
        except Exception as inner:
            raise ModelLoadError(f"model {entry.name!r}: cannot load the processor of {source!r}: {exc}; "
                                 f"nor without torchvision: {inner}") from inner


def images_only_processor(config: Any) -> type:
    """The model's processor class, built without its video processor (which needs
    torchvision): a subclass that declares only an image processor and a tokenizer."""
    import inspect as pyinspect

    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))
    base = getattr(transformers, name, None) if isinstance(name, str) else None
    if base is None or "video_processor" not in pyinspect.signature(base.__init__).parameters:
        raise ModelLoadError(f"no images-only form of the processor for model_type "
                             f"{getattr(config, 'model_type', None)!r}; install torchvision")

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                      chat_template=chat_template, **kwargs)

    return type(base.__name__, (base,), {"__init__": __init__, "__doc__": f"{base.__name__} for images only"})


def load_weights(entry: "ModelEntry", vision: bool = False) -> torch.nn.Module:
    """The model of an entry with its weights, on its device, in eval mode: safetensors
    only unless the entry allows pickles, remote code only when it allows it."""
    source = _source(entry)
    kwargs = _hub_kwargs(entry)
    kwargs["use_safetensors"] = entry.use_safetensors
    kwargs[_dtype_kwarg()] = torch_dtype(entry.dtype) or "auto"
    if entry.device_map is not None:  # accelerate places (and offloads) the modules
        from probescope.offload import max_memory_kwarg

        kwargs["device_map"] = entry.device_map
        if entry.max_memory is not None:
            kwargs["max_memory"] = max_memory_kwarg(entry.max_memory)
        if entry.offload_folder is not None:
            kwargs["offload_folder"] = entry.offload_folder
    from probescope.progress import quiet_libraries

    try:
        with quiet_libraries():  # probescope's progress only, unless asked for
            model = auto_class(vision).from_pretrained(source, **kwargs)
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


def load(entry: "ModelEntry", info: ModelInfo, tokenizer: Any, processor: Any = None) -> LoadedModel:
    """Load the weights of a model that :func:`inspect` accepted; for a model that runs
    on NDIF (``remote = true``), build only its skeleton on the meta device."""
    if entry.remote is True:
        model = skeleton(info.config, entry.trust_remote_code)
        return LoadedModel(info, model, tokenizer, find_blocks(model, info.adapter), processor,
                           remote=True, entry=entry)
    model = load_weights(entry, vision=info.vision is not None)
    if entry.dtype == "auto":
        info.dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return LoadedModel(info, model, tokenizer, find_blocks(model, info.adapter), processor,
                       remote=entry.remote, entry=entry)


def from_objects(
    name: str, model: torch.nn.Module, tokenizer: Any, registry: Any, *,
    architecture: str | None = None, blocks: str | None = None,
) -> LoadedModel:
    """Wrap a model the caller already built (Python API). For a vision-language model,
    ``tokenizer`` is its processor."""
    config = getattr(model, "config", None)
    if config is None:
        raise ModelLoadError(f"model {name!r}: {type(model).__name__} has no transformers config")
    text = text_config(config)
    vision = vision_language(config)
    processor = None
    if vision is not None:
        if not hasattr(tokenizer, "image_processor"):
            raise ModelLoadError(f"model {name!r} is a vision-language model: pass its processor "
                                 f"(transformers AutoProcessor), not a {type(tokenizer).__name__}")
        processor, tokenizer = tokenizer, tokenizer.tokenizer
    adapter = find_adapter(text, registry, architecture=architecture, blocks=blocks)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    info = ModelInfo(
        name=name,
        source=getattr(config, "_name_or_path", "") or f"<in memory: {type(model).__name__}>",
        revision=getattr(config, "_commit_hash", None),
        config=text,
        adapter=adapter,
        num_layers=adapter.num_layers(text),
        max_positions=adapter.max_positions(text),
        dtype=dtype,
        vision=vision,
    )
    return LoadedModel(info, model.eval(), tokenizer, find_blocks(model, adapter), processor)


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()
