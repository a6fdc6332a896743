"""What a renderer is: parameters and a function from datasets to a matplotlib Figure.

Renderers read datasets only, never models, so a saved result can be drawn again long
after the model is gone (``probescope render``).
"""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

import numpy as np
import xarray as xr
from matplotlib.figure import Figure

from probescope.params import Parameters, coerce_parameters  # noqa: F401  (renderers coerce with it)

class Renderer:
    """Base class for renderers. Register instances through ``register_renderers``.

    :attr:`probe` names the probe whose datasets the renderer draws; the runner passes it
    that probe's datasets, one per model, in the configuration's model order.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    probe: ClassVar[str]
    Parameters: ClassVar[type[Parameters]] = Parameters

    def check(self, params: Any, *, prompts: Sequence[str], probe_params: Any, model: Any) -> list:
        """Problems with ``params`` that can be seen before any model runs, for one model
        (a prompt index past the run's prompts, a layer the probe will not read).

        :param prompts: the run's prompts.
        :param probe_params: the validated parameters of the probe entry this draws.
        :param model: the model's :class:`probescope.models.ModelInfo`.
        :returns: :class:`probescope.errors.Problem` s, locations relative to the entry.
        """
        return []

    def render(self, datasets: Sequence[xr.Dataset], params: Any) -> Figure:
        """Draw the datasets (one per model). Build the figure with
        ``matplotlib.figure.Figure`` rather than pyplot, so no global state is touched."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------
# Helpers every renderer needs to read its datasets the same way.

def known_colormap(name: str, advice: str) -> str:
    """``name`` when matplotlib has a colour map of that name; otherwise a ValueError
    (for a parameter validator) that ends with ``advice`` on what to give instead."""
    import matplotlib

    if name not in matplotlib.colormaps:
        raise ValueError(f"{name!r} is not a matplotlib colour map; {advice}")
    return name


def split_models(
    datasets: Sequence[xr.Dataset] | xr.Dataset, error: type[Exception], renderer: str, probe: str,
) -> list[tuple[str, xr.Dataset, bool]]:
    """``(model name, dataset, came from a combined dataset)`` per model.

    Accepts one dataset or several, each either one model's result (named by its
    ``model`` attribute) or results combined along a ``model`` dimension
    (:func:`probescope.combine`), which count as one dataset per model.

    :raises error: no datasets, or something that is not an ``xarray.Dataset``.
    """
    if isinstance(datasets, xr.Dataset):
        datasets = [datasets]
    if datasets is None or len(datasets) == 0:
        raise error(f"no datasets to draw: {renderer} needs the {probe} probe's dataset of at least one model")
    out = []
    for index, ds in enumerate(datasets):
        if not isinstance(ds, xr.Dataset):
            raise error(f"dataset {index} is a {type(ds).__name__}, not an xarray.Dataset")
        if "model" in ds.dims:
            names = ds["model"].values if "model" in ds.coords else range(ds.sizes["model"])
            for k, model in enumerate(names):
                out.append((coord_text(model), ds.isel(model=k), True))
        else:
            out.append((str(ds.attrs.get("model") or f"model {index + 1}"), ds, False))
    return out


def required_variable(ds: xr.Dataset, name: str, model: str, error: type[Exception], renderer: str,
                      probe: str) -> xr.DataArray:
    """``ds[name]``, or ``error`` saying the dataset lacks it and which probe's datasets
    ``renderer`` draws."""
    if name not in ds.data_vars:
        found = ", ".join(map(str, ds.data_vars)) or "none"
        raise error(f"model {model!r}: the dataset has no {name!r} variable (it has: {found}); is this a "
                    f"{probe} dataset? {renderer} draws the {probe} probe's datasets")
    return ds[name]


def index_values(ds: xr.Dataset, dim: str) -> list[int]:
    """The integer coordinate of ``dim``, or positions where the dataset has none."""
    if dim in ds.coords:
        return [int(v) for v in ds[dim].values]
    return list(range(ds.sizes[dim]))


def coord_text(value: Any) -> str:
    """A string from a coordinate value (str, bytes, 0-d array)."""
    if isinstance(value, np.ndarray):
        value = value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
