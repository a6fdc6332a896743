"""Models placed across devices by accelerate (``device_map``), offloaded in part to the
CPU or to disk, so that a model larger than one device can still be probed.

transformers hands a ``device_map`` to accelerate, which leaves the weights of offloaded
modules on the ``meta`` device and installs a hook on each such module that brings its
weights in for the module's own forward, then drops them again. Activations are real
tensors, so the single traced pass reads every site as usual; weights read off the
module (``module.weight``) are meta. This module holds the rules for such models:

- what a model entry's ``device_map``, ``max_memory`` and ``offload_folder`` may be
  (checked before anything loads, every mistake named);
- where a dispatched model takes its inputs (its execution device);
- :class:`OffloadedLayout`, which reads an offloaded module's weights from accelerate's
  own offload store (the same tensors the hook brings in), so weights-only probes and
  the layout API work on a dispatched model instead of meeting meta tensors.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Mapping

from probescope.architectures.layout import ModelLayout

if TYPE_CHECKING:
    import torch

#: ``device_map`` strings that ask accelerate to place the modules itself.
STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
#: places a ``device_map`` table may send a module besides a torch device or GPU index
PLACES = ("disk",)
#: ``max_memory`` keys besides GPU indices (``0``, ``"cuda:1"``).
MEMORY_KEYS = ("cpu", "mps", "disk")
#: the extra that installs what ``device_map`` needs
EXTRA = "offload"

_SIZE = re.compile(r"^\s*\d+(\.\d+)?\s*(kib|mib|gib|kb|mb|gb)\s*$", re.IGNORECASE)


def accelerate_missing() -> str | None:
    """Why ``device_map`` cannot be used here (accelerate is not installed), or None."""
    try:
        import accelerate  # noqa: F401
    except ImportError:
        pass
    else:
        return None
    return (f"device_map needs the accelerate package, which is not installed; install it with "
            f"pip install 'probescope[{EXTRA}]' (or pip install accelerate)")


def _is_device(text: str) -> bool:
    import torch

    try:
        torch.device(text)
    except (RuntimeError, ValueError):
        return False
    return True


def _place_problem(value: Any) -> str | None:
    """Why ``value`` cannot be where a ``device_map`` table puts a module, or None."""
    if isinstance(value, bool):
        return f"{value!r} is not a device"
    if isinstance(value, int):
        return None if value >= 0 else f"{value!r} is not a GPU index (0 or more)"
    if isinstance(value, str) and (value in PLACES or _is_device(value)):
        return None
    return f"{value!r} is not a device"


def check_device_map(value: str | dict[str, Any]) -> str | dict[str, Any]:
    """A ``device_map`` as written, or ValueError naming every value that is wrong."""
    if isinstance(value, str):
        if value in STRATEGIES or _is_device(value):
            return value
        raise ValueError(
            f"{value!r} is not a device map; expected one of {', '.join(map(repr, STRATEGIES))}, a device "
            f"such as \"cpu\" or \"cuda:0\", or a table of module path = device (a device, a GPU index or \"disk\")")
    if not value:
        raise ValueError("the device_map table is empty; give module path = device entries, or \"auto\"")
    bad = [f"{key!r}: {problem}" for key, place in value.items()
           if (problem := _place_problem(place)) is not None]
    if bad:
        raise ValueError(f"{'; '.join(bad)}; each module goes to a device such as \"cpu\" or \"cuda:0\", "
                         f"a GPU index such as 0, or \"disk\"")
    return value


def _memory_key(key: str) -> int | str | None:
    """A ``max_memory`` key as accelerate takes it (GPU keys as ints), or None."""
    if key.isdigit():
        return int(key)
    if key.startswith("cuda:") and key[5:].isdigit():
        return int(key[5:])
    return key if key in MEMORY_KEYS else None


def check_max_memory(value: dict[str, Any]) -> dict[str, Any]:
    """A ``max_memory`` table as written, or ValueError naming every key and value that is wrong."""
    bad = []
    for key, size in value.items():
        if _memory_key(str(key)) is None:
            bad.append(f"key {key!r} is not a device; expected a GPU index (\"0\", \"cuda:1\"), "
                       f"{', '.join(map(repr, MEMORY_KEYS))}")
        if isinstance(size, bool) or not (isinstance(size, int) and size >= 0
                                          or isinstance(size, str) and _SIZE.match(size)):
            bad.append(f"{key!r} = {size!r} is not a size; expected bytes (an integer) or a string such as "
                       f"\"500MiB\" or \"20GB\" (units KiB, MiB, GiB, KB, MB, GB)")
    if bad:
        raise ValueError("; ".join(bad))
    return value


def max_memory_kwarg(value: Mapping[str, Any]) -> dict[int | str, int | str]:
    """``max_memory`` as accelerate takes it: GPU keys as integers."""
    return {_memory_key(str(key)): size for key, size in value.items()}


def devices_named(entry: Any) -> list[tuple[str, str]]:
    """``(key, device)`` for every torch device a model entry names: its ``device``, or
    without it the devices of its ``device_map`` and the GPUs of its ``max_memory``."""
    if entry.device_map is None:
        return [("device", entry.device)]
    named = []
    places = entry.device_map.values() if isinstance(entry.device_map, Mapping) else [entry.device_map]
    for place in places:
        if isinstance(place, int):
            named.append(("device_map", f"cuda:{place}"))
        elif place not in STRATEGIES and place not in PLACES:
            named.append(("device_map", place))
    for key in entry.max_memory or {}:
        gpu = _memory_key(str(key))
        named.append(("max_memory", f"cuda:{gpu}" if isinstance(gpu, int) else str(gpu)))
    return [(key, device) for key, device in dict.fromkeys(named) if device != "disk"]


def unknown_modules(model: "torch.nn.Module", device_map: Any) -> list[str]:
    """The module paths of a ``device_map`` table that ``model`` (its skeleton will do)
    does not have (``""`` is the whole model)."""
    if not isinstance(device_map, Mapping):
        return []
    names = {name for name, _ in model.named_modules()}
    return [key for key in device_map if key not in names]


def is_dispatched(model: "torch.nn.Module") -> bool:
    """Whether accelerate placed ``model`` (it has a ``hf_device_map``)."""
    return isinstance(getattr(model, "hf_device_map", None), Mapping)


def execution_device(model: "torch.nn.Module") -> "torch.device":
    """Where a model takes its inputs: for a dispatched model, the first accelerator in
    its device map (accelerate's main device), else the CPU; otherwise the device of
    its first parameter."""
    import torch

    if not is_dispatched(model):
        return next(model.parameters()).device
    for place in model.hf_device_map.values():
        if isinstance(place, int):
            return torch.device("cuda", place)
        if str(place) not in ("cpu", "disk", "meta"):
            return torch.device(place)
    return torch.device("cpu")


def offloaded(module: "torch.nn.Module", name: str) -> "torch.Tensor":
    """The value of a parameter or buffer that accelerate offloaded (meta on the module),
    read from the store its hook brings it in from.

    :raises ModelLoadError: the tensor is meta but no accelerate hook holds its value.
    """
    from probescope.errors import ModelLoadError

    hook = getattr(module, "_hf_hook", None)
    hooks = [hook, *getattr(hook, "hooks", ())]  # a SequentialHook keeps several in .hooks
    store = next((h.weights_map for h in hooks if getattr(h, "weights_map", None) is not None), None)
    if store is None:
        raise ModelLoadError(
            f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds its value: "
            "the model's weights were never loaded")
    value = store[name]
    meta = getattr(module, name)
    # the hook casts what it brings in to the parameter's dtype (the entry's dtype); so does this
    return value.to(meta.dtype) if value.is_floating_point() and meta.is_floating_point() else value


class OffloadedLayout(ModelLayout):
    """The layout of a model dispatched by accelerate: a module's tensors are its own
    where they are real, and come from accelerate's offload store (the CPU copy or the
    file on disk the module's hook reads) where they are meta. Modules run through their
    hooks as in the model's forward, so :meth:`runnable` is the loaded model's."""

    def tensor(self, path: str, module: "torch.nn.Module", name: str) -> "torch.Tensor | None":
        value = getattr(module, name, None)
        if value is None or value.device.type != "meta":
            return value
        return offloaded(module, name)
