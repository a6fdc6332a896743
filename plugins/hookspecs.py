"""Hook specifications: everything a probescope plugin can do.

A plugin is any module (or object) with functions decorated by ``probescope.hookimpl``
whose names match the specifications below. Declare it in your package's
``pyproject.toml`` under the entry-point group ``probescope``::

    [project.entry-points.probescope]
    my_probes = "my_package.my_probes"

The built-in probes, renderers and architecture adapters are registered through this very
group, so the path a third party takes is the one probescope itself takes on every run.

Registration hooks receive a ``register`` callback rather than returning values, so one
plugin can register any number of things and each registration is attributed to the
plugin that made it. Registering a name another plugin already registered is an error
naming both plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import pluggy

if TYPE_CHECKING:
    import xarray as xr

    from probescope.architectures.base import ArchitectureAdapter
    from probescope.errors import Failure
    from probescope.probe import Probe
    from probescope.renderer import Renderer

PROJECT = "probescope"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_probes(register: Callable[["Probe"], None]) -> None:
    """Register probes.

    Call ``register(probe)`` once for each :class:`probescope.Probe` instance the plugin
    provides. ``probe.name`` is the name users write in ``[[probes]] use = "..."``.

    :param register: callback taking one probe instance; raises
        :class:`probescope.errors.PluginConflictError` if the name is already taken.
    """


@hookspec
def register_renderers(register: Callable[["Renderer"], None]) -> None:
    """Register renderers.

    Call ``register(renderer)`` once for each :class:`probescope.Renderer` instance the
    plugin provides. ``renderer.name`` is the name users write in
    ``[[renderers]] use = "..."`` and pass to ``probescope render --renderer``.

    :param register: callback taking one renderer instance.
    """


@hookspec
def register_architectures(register: Callable[["ArchitectureAdapter"], None]) -> None:
    """Register architecture adapters.

    Call ``register(adapter)`` once for each :class:`probescope.ArchitectureAdapter`
    instance. An adapter maps one model family's modules to probescope's canonical sites
    (block list, residual stream, components, per-head weights, embedding, unembedding)
    and says which transformers ``model_type`` values it handles. A new family usually
    needs only class attributes (``block_paths``, ``component_modules`` in execution
    order, ``final_norm_path``), plus ``components`` for fused modules and ``parallel``;
    see the built-in adapters in ``probescope/architectures/``.

    :param register: callback taking one adapter instance.
    """


@hookspec
def dataset_produced(dataset: "xr.Dataset", model: str, probe: str) -> None:
    """Called once for each dataset a run produces, as soon as it is built.

    The dataset is final (provenance in ``attrs``) but may not be written to disk yet.
    Implementations must not modify it. A variable too large to hold (token_similarity's
    full form, when the run writes) may be computed from temporary files that are gone
    once the dataset is written: read it during the call, not later (the run's returned
    datasets, and ``run_finished``'s, read it from the saved file). Every implementation
    is called; return values are ignored.

    :param dataset: the result of ``probe`` on ``model``.
    :param model: the model's name from the configuration.
    :param probe: the probe's name.
    """


@hookspec
def run_finished(
    results: Mapping[str, Mapping[str, "xr.Dataset"]],
    failures: Sequence["Failure"],
) -> None:
    """Called once when a run ends, after every dataset and figure was written.

    :param results: datasets by model name, then probe name.
    :param failures: one :class:`probescope.Failure` per failed step (its ``model``,
        ``step``: ``model``, ``probe`` or ``renderer``, ``name`` and ``error``, and
        ``describe()`` for one line). Empty when all succeeded.
    """
