"""Weights by canonical name, read from a checkpoint's safetensors files one layer at a time.

A probe that reads only weights (head_classifier, component_norm's weight statistics)
does not need the model in memory: :class:`StreamedLayout` gives it the same API as
:class:`~probescope.architectures.layout.ModelLayout` (``heads``, ``weight``, ``bias``,
``embedding``, ``unembedding``, ``final_norm``, ``mlp_output``), and the same values,
while holding only

- the model's skeleton on the meta device (module structure, no memory), which tells
  where every tensor sits and how it is stored (GPT-2's ``Conv1D``, fused modules);
- the tensors of one block at a time, read when first asked for and dropped when a
  tensor of another block is asked for;
- the tensors outside the blocks once read (embedding, output layer, final norm).

Modules that have to run (block 0's MLP for ``mlp_output``, the final norm) are
materialised from the skeleton with the checkpoint's tensors, the attention left out.
Tensors keep the checkpoint's dtype unless a dtype is given.

A vision-language checkpoint is read the same way: the skeleton is the whole multimodal
model, whose text decoder sits under a prefix (``model.language_model``), and its
checkpoint's names (``language_model.model.layers.N...``, ``model.text_model...``,
Qwen2-VL's bare ``model.layers...``) are matched to it by transformers' own renamings;
the vision tower's tensors are never read.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from probescope.architectures.base import ArchitectureAdapter
from probescope.architectures.layout import ModelLayout
from probescope.checkpoint import Checkpoint
from probescope.errors import ModelLoadError
from probescope.lazy_imports import lazy_import

torch = lazy_import("torch")


def checkpoint_names(model: torch.nn.Module, keys: list[str]) -> dict[str, str]:
    """Parameter name in ``model`` -> tensor name in a checkpoint holding ``keys``.

    Names are matched the way transformers loads a checkpoint (its renamings of legacy
    names, such as GPT-NeoX's ``embed_out``, and the base model prefix added or
    removed). A tensor that transformers would transform on load (merge, split,
    permute) is left unmatched, so asking for it is an error, not a wrong value.
    """
    wanted = dict(model.state_dict(keep_vars=True))
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
    except ImportError:  # transformers before 5: checkpoint names are the model's, prefix aside
        renamings, converters, rename_source_key = [], [], None
    prefix = getattr(model, "base_model_prefix", "") or None
    names: dict[str, str] = {}
    for key in keys:
        if key in wanted:
            names.setdefault(key, key)
            continue
        if rename_source_key is not None:
            renamed, converted = rename_source_key(key, renamings, converters, prefix, wanted)
        else:
            renamed, converted = key, None
            if prefix and f"{prefix}.{key}" in wanted:
                renamed = f"{prefix}.{key}"
            elif prefix and key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in wanted:
                renamed = key[len(prefix) + 1:]
        if converted is None and renamed in wanted:
            names.setdefault(renamed, key)
    # Tied parameters are stored once: every name of one parameter finds the stored one.
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    for aliases in by_param.values():
        stored = next((names[a] for a in aliases if a in names), None)
        for alias in aliases:
            if stored is not None:
                names.setdefault(alias, stored)
    return names


class StreamedLayout(ModelLayout):
    """A :class:`ModelLayout` whose values are read from a :class:`Checkpoint`.

    :param checkpoint: the checkpoint's tensors.
    :param config: the model's transformers config; a vision-language model's whole
        config (with its ``vision_config``), whose text decoder the layout reads.
    :param adapter: the model family's adapter (of the text decoder).
    :param dtype: convert every tensor to this dtype; None keeps the checkpoint's.
    :param device: where tensors go once read.
    """

    def __init__(self, checkpoint: Checkpoint, config: Any, adapter: ArchitectureAdapter, *,
                 dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False):
        from probescope.models import find_blocks, skeleton

        model = skeleton(config, trust_remote_code)
        super().__init__(model, adapter, find_blocks(model, adapter))
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.device = torch.device(device)
        self.names = checkpoint_names(model, checkpoint.keys())
        self._kept: dict[str, torch.Tensor] = {}  # stored name -> tensor, outside the blocks
        self._layer: tuple[int | None, dict[str, torch.Tensor]] = (None, {})  # the one block held

    def stored_dtype(self) -> torch.dtype:
        """The checkpoint's dtype (of its embedding; read from the header only)."""
        module = self.model.get_input_embeddings()
        return self.checkpoint.dtype(self._stored(f"{self._path(module)}.weight"))

    def _stored(self, name: str) -> str:
        if name not in self.names:
            raise ModelLoadError(f"checkpoint {self.checkpoint.source!r} has no tensor for {name!r} "
                                 "(or only one transformers converts on load); load the model instead")
        return self.names[name]

    def _block_of(self, name: str) -> int | None:
        head = f"{self.blocks}."
        if not name.startswith(head):
            return None
        index = name[len(head):].partition(".")[0]
        return int(index) if index.isdigit() else None

    def parameter(self, name: str) -> torch.Tensor:
        """The model's parameter (or persistent buffer) ``name``, read from the checkpoint:
        a block's tensors are held until a tensor of another block is read, others for
        the layout's life."""
        stored = self._stored(name)
        layer = self._block_of(name)
        if layer is None:
            cache = self._kept
        else:
            held, cache = self._layer
            if held != layer:
                cache = {}
                self._layer = (layer, cache)  # the previous block's tensors go now
        if stored not in cache:
            tensor = self.checkpoint.read(stored)
            if self.dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(self.dtype)
            cache[stored] = tensor.to(self.device)
        return cache[stored]

    def tensor(self, path: str, module: torch.nn.Module, name: str) -> torch.Tensor | None:
        if getattr(module, name, None) is None:  # the module has no such parameter
            return None
        return self.parameter(f"{path}.{name}")

    def runnable(self, path: str, skip: tuple[str, ...] = ()) -> torch.nn.Module:
        """A copy of the skeleton's module at ``path`` with the checkpoint's tensors,
        except under ``skip`` (left on the meta device). Not kept: made on each call."""
        module = copy.deepcopy(self.model.get_submodule(path))
        values = {name: self.parameter(f"{path}.{name}") for name in module.state_dict(keep_vars=True)
                  if not any(name == s or name.startswith(f"{s}.") for s in skip)}
        module.load_state_dict(values, strict=False, assign=True)
        return module.eval()


def checkpoint_of(entry: Any) -> Checkpoint:
    """The safetensors checkpoint of a model entry (a local folder or a hub id)."""
    if entry.path is not None:
        return Checkpoint.local(entry.path)
    return Checkpoint.hub(str(entry.hub), entry.revision)


def streamed_layout(entry: Any, config: Any, adapter: ArchitectureAdapter) -> StreamedLayout:
    """A model entry's weights, streamed in the entry's dtype (``auto``: the checkpoint's)
    onto its device."""
    from probescope.models import torch_dtype

    return StreamedLayout(checkpoint_of(entry), config, adapter, dtype=torch_dtype(entry.dtype),
                          device=entry.device, trust_remote_code=entry.trust_remote_code)


@dataclass
class StreamedModel:
    """A model whose probes read only weights: its layout streams them from the checkpoint,
    and the model itself is never built. Stands in for a
    :class:`~probescope.models.LoadedModel` in a probe's :class:`~probescope.probe.ProbeRun`."""

    info: Any  # ModelInfo
    tokenizer: Any
    layout: StreamedLayout

    @classmethod
    def of(cls, entry: Any, info: Any, tokenizer: Any) -> "StreamedModel":
        """Stream a model entry that :func:`~probescope.models.inspect` accepted; with
        dtype ``auto`` the info records the checkpoint's dtype."""
        layout = streamed_layout(entry, info.vision.config if info.vision else info.config, info.adapter)
        if entry.dtype == "auto":
            info.dtype = str(layout.stored_dtype()).removeprefix("torch.")
        return cls(info, tokenizer, layout)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def device(self) -> torch.device:
        return self.layout.device

    @property
    def blocks(self) -> str:
        return self.layout.blocks

    @property
    def model(self) -> torch.nn.Module:
        raise ModelLoadError(
            f"model {self.name!r} was not loaded: every probe of the run reads weights only, so its layout "
            "streams them from the checkpoint; a probe that needs the model object must say so "
            "(Probe.weights_only returning False)")
