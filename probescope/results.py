"""Datasets on disk: provenance, atomic writes, and reading back.

Results are NetCDF files that plain ``xarray.open_dataset`` reads. They are written to a
temporary file beside the target and renamed into place, so an interrupted run never
leaves a half-written file under a result's name.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import xarray as xr

from probescope.formats import RESULT_SUFFIX
from probescope.version import __version__


def provenance(*, probe: Any, params: Any, model_info: Any, entry_name: str) -> dict[str, str]:
    """The ``attrs`` every dataset carries: what produced it, from what, when."""
    return {
        "probe": probe.name,
        "probe_entry": entry_name,
        "probe_version": probe.version,
        "parameters": params.model_dump_json(),
        "model": model_info.name,
        "model_id": model_info.source,
        "model_revision": model_info.revision or "",
        "architecture": model_info.adapter.name,
        "num_layers": model_info.num_layers,
        "dtype": model_info.dtype,
        "probescope_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def parameters(dataset: xr.Dataset) -> dict[str, Any]:
    """The probe parameters a dataset was made with, as a dict."""
    return json.loads(dataset.attrs.get("parameters", "{}"))


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` that replaces it only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write a dataset as NetCDF, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        dataset.to_netcdf(tmp, engine="netcdf4")
    return path


def load(path: str | Path) -> xr.Dataset:
    """Read a saved dataset fully into memory (the file is closed on return)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no dataset file at {str(path)!r}")
    with xr.open_dataset(path, engine="netcdf4") as ds:
        return ds.load()


def result_path(output_dir: Path, model: str, probe_entry: str) -> Path:
    """``DIR/<model>/<probe>.nc``."""
    return output_dir / model / f"{probe_entry}{RESULT_SUFFIX}"


def combine(datasets: Mapping[str, xr.Dataset] | list[xr.Dataset], dim: str = "model") -> xr.Dataset:
    """Several models' datasets of one probe as one dataset along a ``model`` dimension.

    Dimensions that differ in length between models (layers of models of different
    depth, tokens of different tokenizers) are aligned by coordinate with NaN filling
    the gaps; provenance that differs per model moves from ``attrs`` to coordinates.
    """
    if isinstance(datasets, Mapping):
        names, items = list(datasets), list(datasets.values())
    else:
        items = list(datasets)
        names = [ds.attrs.get("model", f"model{i}") for i, ds in enumerate(items)]
    per_model = ("model_id", "model_revision", "architecture", "num_layers", "dtype", "created")
    prepared = []
    for name, ds in zip(names, items):
        ds = ds.copy()
        ds.attrs.pop("model", None)
        coords = {key if key.startswith("model_") else f"model_{key}": (dim, [ds.attrs.pop(key)])
                  for key in per_model if key in ds.attrs}
        prepared.append(ds.expand_dims({dim: [name]}).assign_coords(coords))
    return xr.concat(prepared, dim=dim, join="outer", combine_attrs="drop_conflicts", coords="different", compat="equals")
