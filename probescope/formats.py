"""File formats probescope writes: figure files and dataset files.

The configuration checks an ``output`` name before anything runs, the command line and
the Python API check it again for ``probescope render``; the rule lives here once.
"""

from __future__ import annotations

from pathlib import Path

#: Figure files a renderer's output may be, by extension (matplotlib writes each).
FIGURE_FORMATS = (".png", ".pdf", ".svg")

#: The extension of a saved dataset (NetCDF).
RESULT_SUFFIX = ".nc"


def figure_format_problem(output: str | Path) -> str | None:
    """Why ``output`` cannot be a figure file, or None when its extension is one we write."""
    if Path(output).suffix.lower() in FIGURE_FORMATS:
        return None
    return f"figure file {str(output)!r} must end in one of {', '.join(FIGURE_FORMATS)}"
