"""File formats probescope writes (figure files, dataset files) and reads (weight files).

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


#: Weight files a model folder may hold: safetensors, and pickled checkpoints, which load
#: only when the model entry allows them (``use_safetensors = false``).
SAFE_WEIGHTS = ("*.safetensors",)
PICKLED_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


def weight_files_problem(folder: Path, use_safetensors: bool) -> str | None:
    """Why a local model folder's weights cannot load as the entry asks, or None.

    Checked at validation, so that a folder with only pickled weights (``pytorch_model.bin``)
    is a configuration mistake (exit status 2) before anything loads, not a failure later.
    """
    safe = [p.name for pattern in SAFE_WEIGHTS for p in folder.glob(pattern)]
    pickled = sorted(p.name for pattern in PICKLED_WEIGHTS for p in folder.glob(pattern))
    if safe:
        return None
    if pickled and use_safetensors:
        shown = ", ".join(pickled[:3]) + (", ..." if len(pickled) > 3 else "")
        return (f"folder {str(folder)!r} holds only pickled weights ({shown}), which can run code when "
                "loaded; convert them to safetensors, or set use_safetensors = false in this model entry "
                "if you trust their source")
    if not pickled:
        return f"folder {str(folder)!r} holds no weight files (*.safetensors)"
    return None
