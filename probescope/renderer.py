"""What a renderer is, and the kit every renderer draws with.

A renderer is parameters and a function from datasets to a matplotlib Figure. Renderers
read datasets only, never models, so a saved result can be drawn again long after the
model is gone (``probescope render``).

The kit holds what every renderer would otherwise write again: the error type
(:class:`RendererError`), the ``title`` parameter (:class:`RendererParameters`), one
dataset per model out of whatever was passed (:meth:`Renderer.models`, which also checks
each against the probe's :class:`~probescope.schema.DatasetSchema`), the panel grid
(:func:`panel_grid`) and the figure title (:func:`add_title`). A renderer keeps only its
drawing.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar, Iterable, Optional, Sequence

from pydantic import Field

from probescope.errors import PluginError, Problem
from probescope.layers import layer_label, resolve_layer
from probescope.params import Parameters, coerce_parameters  # noqa: F401  (renderers coerce with it)
from probescope.lazy_imports import lazy_import

np = lazy_import("numpy")
xr = lazy_import("xarray")
mfigure = lazy_import("matplotlib.figure")


if TYPE_CHECKING:
    from probescope.schema import DatasetSchema


class RendererError(PluginError, ValueError):
    """The datasets or the parameters cannot be drawn.

    A :class:`~probescope.errors.PluginError` (so the command line reports it without a
    traceback) and a :class:`ValueError` (so Python callers can catch it as bad input).
    A renderer may subclass it to name its own (``Renderer.Error``).
    """


class RendererParameters(Parameters):
    """Base of a renderer's parameter schema: what every figure takes."""

    title: Optional[str] = Field(None, description="Title above the figure; none by default.")


class Renderer:
    """Base class for renderers. Register instances through ``register_renderers``.

    :attr:`probe` names the probe whose datasets the renderer draws; the runner passes it
    that probe's datasets, one per model, in the configuration's model order.
    :attr:`schema` is that probe's dataset schema, which :meth:`models` checks datasets
    against; :attr:`Error` the error it raises for what it cannot draw.
    """

    name: ClassVar[str]
    version: ClassVar[str] = "0.1.0"
    description: ClassVar[str] = ""
    probe: ClassVar[str]
    Parameters: ClassVar[type[Parameters]] = RendererParameters
    Error: ClassVar[type[RendererError]] = RendererError
    schema: ClassVar[Optional["DatasetSchema"]] = None

    def check(self, params: Any, *, prompts: Sequence[str], probe_params: Any, model: Any) -> list[Problem]:
        """Problems with ``params`` that can be seen before any model runs, for one model
        (a prompt index past the run's prompts, a layer the probe will not read).

        :param prompts: the run's prompts.
        :param probe_params: the validated parameters of the probe entry this draws.
        :param model: the model's :class:`probescope.ModelInfo`.
        :returns: :class:`probescope.Problem` s, locations relative to the entry.
        """
        return []

    def render(self, datasets: Sequence[xr.Dataset], params: Any) -> mfigure.Figure:
        """Draw the datasets (one per model). Build the figure with
        ``matplotlib.figure.Figure`` rather than pyplot, so no global state is touched."""
        raise NotImplementedError

    # ----------------------------------------------------------------------------------
    # The kit

    def parameters(self, params: Any) -> Any:
        """``params`` (None, a mapping, or parameters) as this renderer's :attr:`Parameters`."""
        return coerce_parameters(self.Parameters, params)

    def models(self, datasets: Sequence[xr.Dataset] | xr.Dataset,
               needs: Optional[Iterable[str]] = None) -> list[tuple[str, xr.Dataset, bool]]:
        """``(model name, dataset, came from a combined dataset)`` per model, each checked
        against :attr:`schema` (only the variables in ``needs``, when given).

        :raises Error: no datasets, something that is not a dataset, or a dataset that
            does not fit the schema (every problem named).
        """
        out = split_models(datasets, self.Error, self.name, self.probe)
        if self.schema is not None:
            for model, ds, _ in out:
                check_dataset(ds, self.schema, model=model, renderer=self.name, error=self.Error, needs=needs)
        return out


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


def check_dataset(ds: xr.Dataset, schema: "DatasetSchema", *, model: str, renderer: str,
                  error: type[Exception] = RendererError, needs: Optional[Iterable[str]] = None) -> None:
    """Raise ``error`` naming every way ``ds`` does not fit ``schema`` (the variables in
    ``needs``, or all) as a renderer needs it; say which probe's datasets ``renderer`` draws."""
    problems = schema.problems(ds, needs=needs)
    if problems:
        raise error(f"model {model!r}: {'; '.join(problems)}; is this a {schema.probe} dataset? "
                    f"{renderer} draws the {schema.probe} probe's datasets")


def prompt_problems(index: int, prompts: Sequence[str], key: str = "prompt") -> list[Problem]:
    """A renderer's choice of one prompt, checked against the run's prompts before any
    model loads: a problem when ``index`` is not one of them."""
    if 0 <= index < len(prompts):
        return []
    return [Problem(key, f"prompt {index} is out of range: the run has {len(prompts)} prompts "
                         f"(0 to {len(prompts) - 1})")]


def layer_choice_problems(wanted: Iterable[Any] | None, num_layers: int, read: Iterable[int] | None = None,
                          key: str = "layers") -> list[Problem]:
    """A renderer's choice of layers (as users write them: negative, ``"last"``,
    ``"embed"``), checked before any model loads: a problem for each layer the model does
    not have, and, given ``read`` (the layers the probe reads, resolved), for each the
    probe does not read."""
    read = None if read is None else list(read)
    problems = []
    for i, want in enumerate(wanted or ()):
        try:
            value = resolve_layer(want, num_layers)
        except ValueError as exc:
            problems.append(Problem(f"{key}[{i}]", str(exc)))
            continue
        if read is not None and value not in read:
            have = ", ".join(map(layer_label, read))
            problems.append(Problem(f"{key}[{i}]", f"layer {want!r} is not among the layers the probe reads ({have})"))
    return problems


def panel_grid(n: int, columns: Optional[int] = None) -> tuple[int, int]:
    """``(rows, columns)`` of a grid of ``n`` panels, at most ``columns`` per row; by
    default one row of up to three, a 2 x 2 grid for four, three per row beyond."""
    if columns is None:
        columns = n if n <= 3 else 2 if n == 4 else 3
    columns = max(1, min(columns, n))
    return math.ceil(n / columns), columns


def add_title(figure: mfigure.Figure, title: Optional[str]) -> None:
    """The figure's title (the ``title`` parameter), when there is one; taken literally
    (no mathtext)."""
    if title:
        figure.suptitle(title, fontsize=12, parse_math=False)


def known_colormap(name: str, advice: str) -> str:
    """``name`` when matplotlib has a colour map of that name; otherwise a ValueError
    (for a parameter validator) that ends with ``advice`` on what to give instead."""
    import matplotlib

    if name not in matplotlib.colormaps:
        from probescope.errors import did_you_mean

        raise ValueError(f"{name!r} is not a matplotlib colour map{did_you_mean(name, matplotlib.colormaps)}; {advice}")
    return name


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
