"""The Python API: the same runs as the command line, returning datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import xarray as xr

from probescope import config as config_mod
from probescope import models as models_mod
from probescope import results, runner
from probescope.plugins.manager import Registry, load_registry


def run(
    config: str | Path | Mapping[str, Any],
    *,
    models: Mapping[str, tuple[Any, Any]] | None = None,
    write: bool = True,
    plugins: Iterable[tuple[str, Any]] = (),
    resume: bool = False,
) -> dict[str, dict[str, xr.Dataset]]:
    """Run a configuration and return its datasets by model name, then probe entry name.

    :param config: a TOML file path, or the same structure as a dict (relative paths in a
        dict are taken from the current directory).
    :param models: models already built in this process, as ``{name: (model, tokenizer)}``,
        probed next to the config's ``[[models]]``, in eval mode. probescope traces them
        with nnsight, which installs a controller ``forward`` on each module; probescope
        removes it again, and restores the training flag, when the run ends, so your model
        comes back as it was.
    :param write: also write datasets and figures under the config's output directory.
    :param plugins: extra ``(name, plugin)`` pairs, for plugins defined outside a package
        (in a notebook or a test): a module or object with ``@probescope.hookimpl``
        functions, registered for this call only. One that is also installed (the same
        module object) is used once.
    :param resume: with ``write``, read back the datasets an earlier run wrote for an
        unchanged configuration (its ``manifest.json`` says which) instead of computing them.
    :raises ConfigError: the configuration is invalid; nothing was run or written.
    :raises RunFailed: some probes or renderers failed; ``.datasets`` holds the others.
    """
    registry = load_registry(plugins)
    modes = {name: model.training for name, (model, _) in (models or {}).items()}
    try:
        given = {
            name: models_mod.from_objects(name, model, tokenizer, registry)
            for name, (model, tokenizer) in (models or {}).items()
        }
        plan = config_mod.load_plan(config, registry, given_models=list(given))
        return runner.execute(plan, registry, given, write=write, resume=resume).datasets
    finally:
        for name, (model, _) in (models or {}).items():
            model.train(modes[name])


def load(path: str | Path) -> xr.Dataset:
    """Open a saved dataset (fully read into memory)."""
    return results.load(path)


def render(
    datasets: Sequence[xr.Dataset | str | Path],
    renderer: str,
    output: str | Path | None = None,
    registry: Registry | None = None,
    *,
    plugins: Iterable[tuple[str, Any]] = (),
    **params: Any,
):
    """Draw datasets (or saved files) with a renderer; write the figure when ``output`` is given.

    :param plugins: extra ``(name, plugin)`` pairs, as for :func:`run`: a renderer defined
        in a notebook or a test, used without installing a package.

    :returns: the matplotlib Figure.
    """
    from probescope.errors import ConfigError, PluginError, Problem
    from probescope.formats import figure_format_problem

    bad_output = figure_format_problem(output) if output is not None else None
    if bad_output:
        raise ConfigError(str(output), [Problem("", bad_output)])
    registry = registry or load_registry(plugins)
    plugin = registry.get("renderer", renderer)
    values, problems = config_mod.parameter_problems(plugin, params, ())
    if problems:
        raise ConfigError(f"renderer {renderer}", problems)
    loaded = [results.load(d) if isinstance(d, (str, Path)) else d for d in datasets]
    wrong = [ds.attrs.get("probe", "?") for ds in loaded if ds.attrs.get("probe") != plugin.probe]
    if wrong:
        raise PluginError(f"{renderer} draws {plugin.probe} datasets, got datasets of {', '.join(map(repr, wrong))}")
    figure = plugin.render(loaded, values)
    if output is not None:
        runner.save_figure(figure, Path(output))
    return figure
