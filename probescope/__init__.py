"""probescope: point probes at transformer language models, get labelled xarray datasets
back, and draw figures from them.

Python API::

    import probescope
    results = probescope.run("probes.toml")          # {model: {probe: xarray.Dataset}}
    ds = probescope.load("results/small/token_similarity.nc")

Plugins implement the hooks in :mod:`probescope.plugins.hookspecs` with
:data:`probescope.hookimpl` and subclass :class:`Probe`, :class:`Renderer` or
:class:`ArchitectureAdapter`.
"""

from probescope.version import __version__
from probescope.plugins.hookspecs import hookimpl
from probescope.architectures.base import (  # noqa: E402
    COMPONENTS, ArchitectureAdapter, Component, Features, Site, SiteRef, attention, component, embed,
    head_output, logits, mlp_hidden, resid, resid_final, resid_mid, rotary_k, rotary_q,
)
from probescope.architectures.layout import ModelLayout  # noqa: E402
from probescope.errors import ConfigError, ProbescopeError, RunFailed  # noqa: E402
from probescope.probe import Parameters, Probe, ProbeRun, Read  # noqa: E402
from probescope.renderer import Renderer  # noqa: E402
from probescope.api import load, render, run  # noqa: E402
from probescope.results import combine  # noqa: E402

__all__ = [
    "__version__", "hookimpl", "run", "load", "render", "combine",
    "Probe", "ProbeRun", "Read", "Parameters", "Renderer",
    "ArchitectureAdapter", "Component", "Features", "ModelLayout", "Site", "SiteRef",
    "COMPONENTS", "component", "embed", "resid", "resid_mid", "attention", "head_output", "mlp_hidden",
    "rotary_q", "rotary_k", "resid_final", "logits",
    "ProbescopeError", "ConfigError", "RunFailed",
]
