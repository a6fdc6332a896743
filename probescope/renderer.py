"""What a renderer is: parameters and a function from datasets to a matplotlib Figure.

Renderers read datasets only, never models, so a saved result can be drawn again long
after the model is gone (``probescope render``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import xarray as xr
from matplotlib.figure import Figure

from probescope.probe import Parameters

FIGURE_FORMATS = (".png", ".pdf", ".svg")


def figure_format_problem(output: str | Path) -> str | None:
    """Why ``output`` cannot be a figure file, or None when its extension is one we write."""
    if Path(output).suffix.lower() in FIGURE_FORMATS:
        return None
    return f"figure file {str(output)!r} must end in one of {', '.join(FIGURE_FORMATS)}"


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
