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
from probescope.plugins.hookspecs import hookimpl
from probescope.architectures.base import (
    COMPONENTS, ArchitectureAdapter, Component, Features, Site, SiteRef, attention, component, embed,
    head_output, logits, mlp_hidden, resid, resid_final, resid_mid, rotary_k, rotary_q,
)
from probescope.architectures.layout import ModelLayout
from probescope.architectures.streamed import streamed_layout
from probescope.errors import (
    ConfigError, Failure, ModelLoadError, PluginError, Problem, ProbescopeError, ProbescopeWarning, RunFailed,
    SiteError,
)
from probescope.inputs import THUMBNAIL_SIDE, TOKEN_KINDS, Batch, Prompt, thumbnails, token_kind_codes
from probescope.layers import (
    EMBED, EMBED_LAYER, LAST, Block, Layer, layer_label, layer_problems, resolve_layer, resolve_layers,
)
from probescope.models import LoadedModel, ModelInfo, is_model_folder, load_weights, read_config
from probescope.config import ModelEntry
from probescope.params import ConfigPath, Parameters, distinct
from probescope.probe import Probe, ProbeRun, Read
from probescope.progress import progress
from probescope.tokens import clean_token
from probescope.schema import DatasetSchema, Variable
from probescope.renderer import (
    Renderer, RendererError, RendererParameters, add_title, check_dataset, coord_text, index_values,
    known_colormap, panel_grid,
)
from probescope.api import load, render, run
from probescope.results import combine

__all__ = [
    # running and reading results
    "__version__", "run", "load", "render", "combine",
    # writing plugins
    "hookimpl", "Probe", "ProbeRun", "Read", "Parameters", "ConfigPath", "distinct",
    "Renderer", "RendererParameters", "RendererError", "add_title", "check_dataset", "panel_grid",
    "known_colormap", "index_values", "coord_text", "clean_token",
    "DatasetSchema", "Variable",
    "Batch", "Prompt", "TOKEN_KINDS", "THUMBNAIL_SIDE", "token_kind_codes", "thumbnails", "ModelInfo", "LoadedModel", "ModelLayout", "streamed_layout", "progress",
    "ModelEntry", "read_config", "load_weights", "is_model_folder",
    # layers
    "Layer", "Block", "EMBED", "LAST", "EMBED_LAYER", "resolve_layer", "resolve_layers", "layer_problems",
    "layer_label",
    # sites and architectures
    "ArchitectureAdapter", "Component", "Features", "Site", "SiteRef",
    "COMPONENTS", "component", "embed", "resid", "resid_mid", "attention", "head_output", "mlp_hidden",
    "rotary_q", "rotary_k", "resid_final", "logits",
    # errors and problems
    "Problem", "Failure", "ProbescopeError", "ConfigError", "RunFailed", "PluginError", "SiteError",
    "ModelLoadError", "ProbescopeWarning",
]
