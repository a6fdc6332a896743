"""Datasets too large to hold: a variable computed region by region, written in slabs.

A probe whose dataset grows with the prompt count (token_similarity's full form) builds
its large variable with :func:`lazy_variable`: the dataset then holds only a function
that computes any region of it (from results spilled to disk during the pass, see
:mod:`probescope.spill`), never the values. Indexing it (``ds.similarity.isel(...)``)
computes only that region; ``.values`` or ``.load()`` compute it all.

:func:`probescope.results.save` writes such a dataset without holding the variable:
xarray writes everything else, then the variable is created in the same NetCDF file
with netCDF4 and filled slab by slab along its parted dimension, each slab a whole number
of the file's chunks (so each compressed chunk is written once). The file is the one
plain ``xarray.open_dataset`` reads: same variables, coordinates, attributes and
encoding as writing the loaded dataset.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from probescope.lazy_imports import lazy_import

np = lazy_import("numpy")
xr = lazy_import("xarray")

#: Largest slab written (and computed) at once, in bytes.
SLAB_BYTES = 32 * 2**20

Region = tuple  # one slice per dimension, steps of 1


def lazy_variable(dims: Sequence[str], shape: Sequence[int], dtype: Any,
                  read: Callable[[Region], "np.ndarray"], attrs: dict | None = None,
                  parted: str | None = None, chunk: int | None = None) -> "xr.Variable":
    """An ``xarray.Variable`` whose values are computed by ``read(region)`` when asked for.

    :param read: given one ``slice`` per dimension (start and stop set, step 1), returns
        that region's values as an array of ``dtype``, shaped as the region.
    :param parted: the dimension the file is written along, slab by slab (default the
        first); every other dimension is written whole in each slab.
    :param chunk: the file's chunk length along ``parted`` (default: slabs of at most
        :data:`SLAB_BYTES`); set ``encoding`` (``zlib``, ...) on the variable as usual.
    """
    from xarray.core import indexing

    dims = tuple(dims)
    array = _computed_class()(tuple(int(n) for n in shape), np.dtype(dtype), read,
                      dims.index(parted) if parted is not None else 0, chunk)
    return xr.Variable(dims, indexing.LazilyIndexedArray(array), attrs or {})


def computed(variable: "xr.Variable") -> "_Computed | None":
    """The region function behind a variable made by :func:`lazy_variable` and not loaded
    since, else None."""
    data = getattr(variable, "_data", None)
    inner = getattr(data, "array", None)
    return inner if isinstance(inner, _Computed) and _whole(data, inner.shape) else None


def _whole(data: Any, shape: tuple) -> bool:
    """Whether a lazily indexed array still covers the whole of its source (not a selection)."""
    return tuple(getattr(data, "shape", ())) == shape


def write_lazy(path: Any, dataset: "xr.Dataset", names: Sequence[str]) -> None:
    """Create each lazy variable (data variable or coordinate) of ``names`` in the NetCDF
    file at ``path`` (which holds the rest of ``dataset``) and fill it slab by slab."""
    import netCDF4

    named: set[str] = set()  # coordinates some written variable names in its ``coordinates``
    with netCDF4.Dataset(path, "a") as nc:
        for name in names:
            variable = dataset.variables[name]
            source = computed(variable)
            for dim, size in zip(variable.dims, variable.shape):
                if dim not in nc.dimensions:
                    nc.createDimension(dim, size)
            encoding = variable.encoding
            fill = encoding.get("_FillValue", variable.attrs.get("_FillValue"))
            if fill is None and source.dtype.kind == "f":
                fill = np.nan  # what xarray writes for floating point
            chunks = source.chunks(encoding.get("chunksizes"))
            target = nc.createVariable(
                name, source.dtype, variable.dims, fill_value=fill,
                zlib=bool(encoding.get("zlib", False)), complevel=int(encoding.get("complevel", 4)),
                shuffle=bool(encoding.get("shuffle", True)), chunksizes=chunks if all(chunks) else None,
            )
            target.set_auto_maskandscale(False)  # NaN goes in as NaN, as xarray writes it
            for key, value in variable.attrs.items():
                if key != "_FillValue":
                    target.setncattr(key, value)
            # the coordinates that label a data variable, as xarray names them for one it writes
            labels = sorted(str(n) for n, c in dataset.coords.items()
                            if n not in dataset.dims and set(c.dims) <= set(variable.dims))
            if name in dataset.data_vars and labels and "coordinates" not in variable.attrs:
                target.setncattr("coordinates", " ".join(labels))
                named.update(labels)
            for region in source.slabs(chunks):
                target[region] = source.read(region)
        # A coordinate written here that no variable names is named in the file's own
        # ``coordinates`` attribute (what xarray does), so it reads back as a coordinate.
        unnamed = [name for name in names if name in dataset.coords and name not in named]
        if unnamed:
            given = nc.getncattr("coordinates").split() if "coordinates" in nc.ncattrs() else []
            nc.setncattr("coordinates", " ".join(dict.fromkeys([*given, *unnamed])))


def _computed_class() -> type:
    """:class:`_Computed` as an xarray backend array (made on first use: importing this
    module must not import xarray, so that listing plugins stays fast)."""
    if not _CLASS:
        from xarray.backends import BackendArray

        _CLASS.append(type("ComputedArray", (_Computed, BackendArray), {"__slots__": ()}))
    return _CLASS[0]


_CLASS: list = []


class _Computed:
    """The array behind a lazy variable: shape, dtype and the function computing a region
    (xarray's backend-array protocol: ``__getitem__`` takes an explicit indexer)."""

    def __init__(self, shape: tuple, dtype: Any, read: Callable, axis: int, chunk: int | None):
        self.shape, self.dtype, self._read, self.axis, self.chunk = shape, dtype, read, axis, chunk
        self.count = int(np.prod(shape)) if shape else 1  # values in all

    def __getitem__(self, key: Any) -> "np.ndarray":
        from xarray.core import indexing

        return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC, self._basic)

    def __deepcopy__(self, memo: dict) -> "_Computed":
        return self  # read-only: a deep copy of the dataset shares it

    def _basic(self, key: tuple) -> "np.ndarray":
        """Basic indexing (ints and slices) through ``read`` of the enclosing region."""
        region, pick = [], []
        for k, n in zip(key, self.shape):
            if isinstance(k, slice):
                start, stop, step = k.indices(n)
                if step < 0:
                    start, stop = stop + 1, start + 1
                region.append(slice(start, max(start, stop)))
                pick.append(slice(None, None, step) if step != 1 else slice(None))
                if step < 0:
                    pick[-1] = slice(None, None, step)
            else:
                k = int(k) % n if n else int(k)
                region.append(slice(k, k + 1))
                pick.append(0)
        region += [slice(0, n) for n in self.shape[len(key):]]
        return self.read(tuple(region))[tuple(pick)]

    def read(self, region: tuple) -> "np.ndarray":
        shape = tuple(s.stop - s.start for s in region)
        if 0 in shape:
            return np.empty(shape, self.dtype)
        values = np.asarray(self._read(region), dtype=self.dtype)
        if values.shape != shape:
            raise ValueError(f"a lazy variable's read function returned shape {values.shape} for a region "
                             f"of shape {shape}")
        return values

    def chunks(self, given: Sequence[int] | None = None) -> tuple:
        """The file's chunk shape: ``given`` (the variable's ``chunksizes`` encoding), else
        whole along every dimension but the parted one, :attr:`chunk` (or as many as fit
        :data:`SLAB_BYTES`) along it."""
        if given:
            return tuple(int(c) for c in given)
        rest = max(1, self.count // max(self.shape[self.axis], 1)) * self.dtype.itemsize
        length = self.chunk or max(1, SLAB_BYTES // rest)
        return tuple(min(max(int(length), 1), n) if a == self.axis else n for a, n in enumerate(self.shape))

    def slabs(self, chunks: tuple) -> Iterator[tuple]:
        """Regions covering the array, whole chunks along the parted dimension, each of at
        most :data:`SLAB_BYTES` (at least one chunk)."""
        if 0 in self.shape:
            return
        step = chunks[self.axis]
        per_chunk = max(1, self.count // max(self.shape[self.axis], 1)) * step * self.dtype.itemsize
        step *= max(1, SLAB_BYTES // per_chunk)
        n = self.shape[self.axis]
        for start in range(0, n, step):
            yield tuple(slice(start, min(start + step, n)) if a == self.axis else slice(0, m)
                        for a, m in enumerate(self.shape))
