"""probescope: point probes at transformer language models, get labelled xarray datasets
back, and draw figures from them.

Python API::

    import probescope
    results = probescope.run("probes.toml")          # {model: {probe: xarray.Dataset}}
    ds = probescope.load("results/small/token_similarity.nc")

Plugins implement the hooks in :mod:`probescope.plugins.hookspecs` with
:data:`probescope.hookimpl` and subclass :class:`Probe`, :class:`Renderer` or
:class:`ArchitectureAdapter`. Every name a plugin needs is importable from here and
listed in ``__all__``; the modules they are defined in are private.
"""

from probescope.version import __version__
# ``progress`` is also the name of its (cheap) module: bound here, before anything imports
# the module, so ``probescope.progress`` is always the function.
from probescope.progress import progress

# Where each public name is defined. Importing probescope costs nothing until a name is
# used (PEP 562): ``probescope --help`` and ``probescope plugins`` must not pay for torch,
# transformers, nnsight and matplotlib, which the modules below import.
_HOME = {
    **dict.fromkeys(('hookimpl',), 'probescope.plugins.hookspecs'),
    **dict.fromkeys(('COMPONENTS', 'ArchitectureAdapter', 'Component', 'Features', 'Site', 'SiteRef', 'attention', 'component', 'embed', 'head_output', 'logits', 'mlp_hidden', 'resid', 'resid_final', 'resid_mid', 'rotary_k', 'rotary_q'), 'probescope.architectures.base'),
    **dict.fromkeys(('ModelLayout',), 'probescope.architectures.layout'),
    **dict.fromkeys(('streamed_layout',), 'probescope.architectures.streamed'),
    **dict.fromkeys(('ConfigError', 'Failure', 'ModelLoadError', 'PluginError', 'Problem', 'ProbescopeError', 'ProbescopeWarning', 'RunFailed', 'SiteError'), 'probescope.errors'),
    **dict.fromkeys(('THUMBNAIL_SIDE', 'TOKEN_KINDS', 'Batch', 'Prompt', 'thumbnails', 'token_kind_codes'), 'probescope.inputs'),
    **dict.fromkeys(('EMBED', 'EMBED_LAYER', 'LAST', 'Block', 'Layer', 'distinct_layers', 'layer_label', 'layer_problems', 'resolve_layer', 'resolve_layers'), 'probescope.layers'),
    **dict.fromkeys(('LoadedModel', 'ModelInfo', 'is_model_folder', 'load_weights', 'read_config'), 'probescope.models'),
    **dict.fromkeys(('ModelEntry',), 'probescope.config'),
    **dict.fromkeys(('ConfigPath', 'Parameters', 'distinct'), 'probescope.params'),
    **dict.fromkeys(('Probe', 'ProbeRun', 'Read'), 'probescope.probe'),
    **dict.fromkeys(('clean_token',), 'probescope.tokens'),
    **dict.fromkeys(('DatasetSchema', 'Variable'), 'probescope.schema'),
    **dict.fromkeys(('Renderer', 'RendererError', 'RendererParameters', 'add_title', 'check_dataset', 'coord_text', 'index_values', 'known_colormap', 'layer_choice_problems', 'panel_grid', 'prompt_problems'), 'probescope.renderer'),
    **dict.fromkeys(('load', 'render', 'run'), 'probescope.api'),
    **dict.fromkeys(('combine',), 'probescope.results'),
    **dict.fromkeys(('lazy_import',), 'probescope.lazy_imports'),
    **dict.fromkeys(('lazy_variable',), 'probescope.parts'),
}


__all__ = [
    # running and reading results
    "__version__", "run", "load", "render", "combine",
    # writing plugins
    "hookimpl", "Probe", "ProbeRun", "Read", "Parameters", "ConfigPath", "distinct",
    "Renderer", "RendererParameters", "RendererError", "add_title", "check_dataset", "panel_grid",
    "known_colormap", "index_values", "coord_text", "clean_token", "prompt_problems", "layer_choice_problems",
    "DatasetSchema", "Variable",
    "Batch", "Prompt", "TOKEN_KINDS", "THUMBNAIL_SIDE", "token_kind_codes", "thumbnails", "ModelInfo", "LoadedModel", "ModelLayout", "streamed_layout", "progress",
    "ModelEntry", "read_config", "load_weights", "is_model_folder", "lazy_import", "lazy_variable",
    # layers
    "Layer", "Block", "EMBED", "LAST", "EMBED_LAYER", "resolve_layer", "resolve_layers", "layer_problems",
    "layer_label", "distinct_layers",
    # sites and architectures
    "ArchitectureAdapter", "Component", "Features", "Site", "SiteRef",
    "COMPONENTS", "component", "embed", "resid", "resid_mid", "attention", "head_output", "mlp_hidden",
    "rotary_q", "rotary_k", "resid_final", "logits",
    # errors and problems
    "Problem", "Failure", "ProbescopeError", "ConfigError", "RunFailed", "PluginError", "SiteError",
    "ModelLoadError", "ProbescopeWarning",
]


def __getattr__(name: str):
    """Import the module defining ``name`` on first use, and keep the value here."""
    try:
        module = _HOME[name]
    except KeyError:
        raise AttributeError(f"module 'probescope' has no attribute {name!r}") from None
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
