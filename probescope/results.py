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

from probescope.errors import DatasetSaveError
from probescope.formats import RESULT_SUFFIX
from probescope.version import __version__


def provenance(*, probe: Any, params: Any, model_info: Any, entry_name: str,
               prompts: list[str] | None = None) -> dict[str, str]:
    """The ``attrs`` every dataset carries: what produced it, from what, when; for a
    dataset of activations, also the prompts it read (``prompts``, JSON)."""
    extra = {"prompts": json.dumps(list(prompts))} if prompts is not None else {}
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
        **extra,
    }


def parameters(dataset: xr.Dataset) -> dict[str, Any]:
    """The probe parameters a dataset was made with, as a dict."""
    return json.loads(dataset.attrs.get("parameters", "{}"))


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, deepest first."""
    created = []
    for parent in [folder, *folder.parents]:
        if parent.exists():
            break
        created.append(parent)
    folder.mkdir(parents=True, exist_ok=True)
    return created


def remove_empty(created: list[Path]) -> None:
    """Remove the folders :func:`make_folders` created that are still empty, deepest first."""
    for folder in created:
        try:
            folder.rmdir()
        except OSError:  # not empty: something else was written there
            break


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside ``target`` that replaces it only if the block succeeds.

    The file gets the permissions any new file gets (``0o666`` less the umask), not
    ``mkstemp``'s owner-only ``0o600``. When the block fails (or is interrupted), the
    temporary file and any folder made for it that is still empty are removed: nothing
    half-written, no empty model folder.
    """
    target = Path(target)
    created = make_folders(target.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        remove_empty(created)
        raise


def save(dataset: xr.Dataset, path: str | Path) -> Path:
    """Write a dataset as NetCDF, atomically.

    Variables computed lazily (:func:`probescope.lazy_variable`) are written slab by slab
    after the rest, so the dataset is never held whole (:mod:`probescope.parts`).

    :raises DatasetSaveError: NetCDF cannot hold something in the dataset (an attribute
        that is a dict, an object array of mixed types); nothing is left on disk.
    """
    from probescope import parts

    path = Path(path)
    lazy = _lazy_names(dataset)
    try:
        with atomic_path(path) as tmp:
            dataset.drop_vars(lazy).to_netcdf(tmp, engine="netcdf4")
            parts.write_lazy(tmp, dataset, lazy)
    except (TypeError, ValueError) as exc:
        raise DatasetSaveError(f"cannot be saved as NetCDF to {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    return path


def _lazy_names(dataset: xr.Dataset) -> list[str]:
    """The variables of ``dataset`` (data variables and coordinates) computed lazily and
    not loaded yet."""
    from probescope import parts

    return [str(name) for name, variable in dataset.variables.items() if parts.computed(variable) is not None]


def is_lazy(dataset: xr.Dataset) -> bool:
    """Whether some variable is computed lazily (:func:`probescope.lazy_variable`)."""
    return bool(_lazy_names(dataset))


def loaded(dataset: xr.Dataset) -> xr.Dataset:
    """``dataset`` with every lazily computed variable computed into memory."""
    return dataset.load() if is_lazy(dataset) else dataset


def open_saved(path: str | Path) -> xr.Dataset:
    """A saved dataset opened lazily: values are read from the file when used (for
    results too large to hold; :func:`load` reads everything)."""
    return xr.open_dataset(path, engine="netcdf4")


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


#: What :func:`combine` writes where a model lacks an entry of a coordinate (a layer a
#: shallower model does not have, a token position past its prompt): integer
#: coordinates stay integer with -1, strings get "", booleans False. Data variables get
#: NaN (integers and booleans among them become floating point), so missing data stay NaN.
COORDINATE_FILL = {"i": -1, "u": 0, "b": False, "U": "", "S": b"", "O": ""}

#: Provenance attributes that always move to a ``model_*`` coordinate when combining.
PER_MODEL_ATTRS = ("model_id", "model_revision", "architecture", "num_layers", "dtype", "created")


def combine(datasets: Mapping[str, xr.Dataset] | list[xr.Dataset], dim: str = "model") -> xr.Dataset:
    """Several models' datasets of one probe as one dataset along a ``model`` dimension.

    Only datasets of the same probe made with the same parameters combine; anything else
    is a :class:`~probescope.errors.CombineError` naming what differs (a cosine and a
    centred-cosine similarity are not the same quantity).

    Dimensions that differ between models are aligned **by coordinate value**: layer
    ``l`` of one model sits beside layer ``l`` of another, so for models of different
    depth the deeper one's extra layers are missing (NaN) for the shallower one; compare
    relative depth with ``layer / model_num_layers``. Tokens of different tokenizers
    align by position. Where a model lacks an entry, data variables hold NaN and
    coordinates the fill value of :data:`COORDINATE_FILL` (integers -1, strings "").
    Provenance that differs per model moves from ``attrs`` to ``model_*`` coordinates.
    """
    from probescope.errors import CombineError

    if isinstance(datasets, Mapping):
        names, items = [str(n) for n in datasets], list(datasets.values())
    else:
        items = list(datasets)
        names = [str(ds.attrs.get("model", f"model{i}")) for i, ds in enumerate(items)]
    if not items:
        raise CombineError("nothing to combine: give at least one dataset")
    if len(set(names)) != len(names):
        raise CombineError(f"two datasets have the same model name ({', '.join(names)}); pass a dict of distinct names")
    _same_probe_and_parameters(names, items)

    differing = {key for key in set().union(*(ds.attrs for ds in items))
                 if key != "model" and len({_attr_key(ds.attrs.get(key)) for ds in items}) > 1}
    moving = [key for key in dict.fromkeys([*PER_MODEL_ATTRS, *sorted(differing)])
              if any(key in ds.attrs for ds in items)]
    fill = {}
    for ds in items:
        for name, coord in ds.coords.items():
            if name not in ds.dims and coord.dtype.kind in COORDINATE_FILL:
                fill.setdefault(name, COORDINATE_FILL[coord.dtype.kind])
    prepared = []
    for name, ds in zip(names, items):
        ds = ds.copy()
        ds.attrs.pop("model", None)
        coords = {key if key.startswith("model_") else f"model_{key}": (dim, [ds.attrs.pop(key, "")])
                  for key in moving}
        prepared.append(ds.expand_dims({dim: [name]}).assign_coords(coords))
    combined = xr.concat(prepared, dim=dim, join="outer", combine_attrs="drop_conflicts", coords="different",
                         compat="equals", fill_value=fill or xr.core.dtypes.NA)
    for name, value in fill.items():  # keep each coordinate's own type
        dtype = next(ds[name].dtype for ds in items if name in ds.coords)
        if name in combined.coords and combined[name].dtype != dtype and dtype.kind in "iub":
            combined = combined.assign_coords({name: combined[name].fillna(value).astype(dtype)})
    return combined


def _attr_key(value: Any) -> Any:
    """An attribute value in a form that can be compared and hashed (arrays as tuples)."""
    import numpy as np

    return tuple(np.asarray(value).ravel().tolist()) if isinstance(value, (list, np.ndarray)) else value


def _same_probe_and_parameters(names: list[str], items: list[xr.Dataset]) -> None:
    """A :class:`CombineError` unless every dataset comes from the same probe with the
    same parameters."""
    from probescope.errors import CombineError

    probes = {name: ds.attrs.get("probe") for name, ds in zip(names, items)}
    if len(set(probes.values())) > 1:
        shown = ", ".join(f"{name!r}: {probe or 'unknown'}" for name, probe in probes.items())
        raise CombineError(f"cannot combine datasets of different probes ({shown}); combine one probe's datasets")
    params = {name: parameters(ds) for name, ds in zip(names, items)}
    first_name, first = names[0], params[names[0]]
    for name in names[1:]:
        if params[name] != first:
            keys = sorted(k for k in set(first) | set(params[name]) if first.get(k) != params[name].get(k))
            shown = "; ".join(f"{k}: {first.get(k)!r} for {first_name!r}, {params[name].get(k)!r} for {name!r}"
                              for k in keys)
            raise CombineError(f"cannot combine {probes[name] or 'datasets'} datasets made with different "
                               f"parameters ({shown}); they do not measure the same thing")
