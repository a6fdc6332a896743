"""Dataset schemas as code: what a probe's dataset holds, checked and documented from one
declaration.

A probe declares its :class:`DatasetSchema` (dimensions, coordinates, data variables with
their dimensions and types, CF flag variables, attributes) as ``Probe.schema``. The same
declaration

- checks the probe's ``build`` output in tests (:meth:`DatasetSchema.problems` with
  ``strict=True``: exact types, nothing undeclared);
- checks what a renderer is given (:func:`probescope.renderer.check_dataset`: what the
  drawing needs is there, in a form it can draw, also after a round trip through NetCDF
  or :func:`probescope.combine`);
- writes the schema sections of ``docs/datasets.md`` (:mod:`probescope.datasets_page`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence
from probescope.lazy_imports import lazy_import

np = lazy_import("numpy")
xr = lazy_import("xarray")


#: The types a variable may declare: numpy dtype names, "str" for text (stored as
#: object or fixed-width unicode), "float" for any floating type.
TYPES = ("float", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "bool", "str")
_KIND = {"float": "f", "float32": "f", "float64": "f", "int8": "i", "int16": "i", "int32": "i",
         "int64": "i", "uint8": "u", "bool": "b", "str": "OUS"}


@dataclass(frozen=True)
class Variable:
    """A coordinate or data variable of a dataset.

    :param dims: its dimensions, in order.
    :param dtype: one of :data:`TYPES`.
    :param description: what it holds, for the documentation.
    :param flags: CF flags: it carries ``flag_values`` and ``flag_meanings`` attributes
        of equal length.
    :param optional: a dataset may leave it out (say, present only for one statistic).
    :param values: the only values it may hold (as text), when they are a fixed set.
    """

    dims: tuple[str, ...]
    dtype: str
    description: str = ""
    flags: bool = False
    optional: bool = False
    values: Optional[tuple[str, ...]] = None

    def __post_init__(self) -> None:
        if self.dtype not in TYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(TYPES)}")
        object.__setattr__(self, "dims", tuple(self.dims))


@dataclass(frozen=True)
class DatasetSchema:
    """What one probe's dataset holds.

    :param dims: every dimension, with what it indexes.
    :param coords: coordinates by name (a dimension's own coordinate has that name).
    :param variables: data variables by name.
    :param attrs: the probe's own attributes (provenance is added to every dataset by the
        runner and is not listed), with what each means.
    :param optional_attrs: attributes present only for some parameters.
    """

    probe: str
    dims: Mapping[str, str]
    coords: Mapping[str, Variable]
    variables: Mapping[str, Variable]
    attrs: Mapping[str, str] = field(default_factory=dict)
    optional_attrs: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, var in {**self.coords, **self.variables}.items():
            unknown = [d for d in var.dims if d not in self.dims]
            if unknown:
                raise ValueError(f"{self.probe} schema: {name!r} has undeclared dimension(s) {unknown}")

    # ----------------------------------------------------------------------------------
    # Checking

    def problems(self, ds: xr.Dataset, *, strict: bool = False, needs: Iterable[str] | None = None) -> list[str]:
        """Every way ``ds`` differs from the schema, as sentences (empty when it fits).

        :param strict: a probe's fresh ``build`` output: types exactly as declared, the
            probe's attributes present, nothing undeclared. Otherwise (what a renderer
            is given: a saved or combined dataset) types need only be of the same kind
            (a number, text, a truth value; combining models pads integers with NaN) and
            undeclared extras are ignored.
        :param needs: check only these variables and coordinates (and the dimensions they
            use); default all.
        """
        out: list[str] = []
        declared = {**self.coords, **self.variables}
        wanted = list(declared) if needs is None else list(needs)
        dims_used = {d for name in wanted if name in declared for d in declared[name].dims}
        # A dimension only optional variables use (an image's pixels) may be absent.
        required = {d for var in declared.values() if not var.optional for d in var.dims}
        for dim in self.dims:
            used = any(dim in var.dims for var in declared.values())
            if (dim in dims_used or strict) and dim not in ds.dims and (dim in required or not used):
                out.append(f"the dataset has no {dim!r} dimension")
            elif dim in dims_used and not strict and dim in ds.dims and ds.sizes[dim] == 0:
                out.append(f"the dataset has 0 {dim}(s); it needs at least one")
        for name in wanted:
            var = declared[name]
            where = ds.coords if name in self.coords else ds.data_vars
            if name not in where:
                if not var.optional and not (name in self.coords and set(var.dims) - set(ds.dims)):
                    kind = "coordinate" if name in self.coords else "variable"
                    found = ", ".join(map(str, where)) or "none"
                    out.append(f"the dataset has no {name!r} {kind} (it has: {found})")
                continue
            index = name in self.coords and var.dims == (name,)
            out += [f"{name!r} {p}" for p in _variable_problems(ds[name], var, strict or index, exact=strict)]
            if name in self.coords and var.dims == (name,) and name in ds.dims:
                values = ds[name].values.tolist()
                twice = sorted({str(v) for v in values if values.count(v) > 1})
                if twice:
                    out.append(f"{name!r} lists {', '.join(twice)} more than once")
        if strict:
            out += [f"undeclared dimension {d!r}" for d in ds.dims if d not in self.dims]
            out += [f"undeclared coordinate {c!r}" for c in ds.coords if c not in self.coords]
            out += [f"undeclared variable {v!r}" for v in ds.data_vars if v not in self.variables]
            out += [f"no {a!r} attribute" for a in self.attrs if a not in ds.attrs]
        return out

    # ----------------------------------------------------------------------------------
    # Documenting

    def markdown(self) -> str:
        """The schema as Markdown tables: dimensions, coordinates and variables, attributes."""
        lines = ["| dimension | indexes |", "| --- | --- |"]
        lines += [f"| `{d}` | {_cell(text)} |" for d, text in self.dims.items()]
        lines += ["", "| name | kind | dimensions | type | meaning |", "| --- | --- | --- | --- | --- |"]
        for kind, table in (("coordinate", self.coords), ("variable", self.variables)):
            for name, var in table.items():
                meaning = var.description
                if var.flags:
                    meaning += " CF flags: `flag_values` and `flag_meanings` attributes."
                if var.values is not None:
                    meaning += " One of " + ", ".join(f"`{v}`" for v in var.values) + "."
                if var.optional:
                    meaning += " (Not always present.)"
                dims = ", ".join(f"`{d}`" for d in var.dims)
                lines.append(f"| `{name}` | {kind} | {dims} | {var.dtype} | {_cell(meaning.strip())} |")
        if self.attrs or self.optional_attrs:
            lines += ["", "| attribute | meaning |", "| --- | --- |"]
            lines += [f"| `{a}` | {_cell(text)} |" for a, text in self.attrs.items()]
            lines += [f"| `{a}` | {_cell(text)} (only then) |" for a, text in self.optional_attrs.items()]
        return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _variable_problems(array: xr.DataArray, var: Variable, strict: bool, exact: bool = True) -> list[str]:
    out = []
    dims = tuple(array.dims)
    if (dims != var.dims) if strict else (set(dims) != set(var.dims)):
        out.append(f"has dimensions {dims}, expected {var.dims}")
    dtype = array.dtype
    if strict:
        fits = dtype.kind in _KIND[var.dtype] if var.dtype in ("str", "float") else dtype == np.dtype(var.dtype)
        fits = fits or (exact is False and dtype.kind in _KIND[var.dtype].replace("i", "iu"))
    elif var.dtype == "str":
        fits = dtype.kind in "OUS"
    else:  # a number or truth value; NaN padding from combining turns ints and bools into floats or objects
        fits = dtype.kind in "biuf" or (dtype.kind == "O" and _all_numbers(array))
    if not fits:
        out.append(f"holds {dtype} data, expected {var.dtype}")
    if var.flags and strict:  # a renderer reads the flags itself, to colour them
        values, meanings = array.attrs.get("flag_values"), array.attrs.get("flag_meanings")
        missing = [a for a, v in (("flag_values", values), ("flag_meanings", meanings)) if v is None]
        if missing:
            out += [f"has no {a} attribute (CF flags: flag_values and flag_meanings)" for a in missing]
        elif len(np.atleast_1d(values)) != len(str(meanings).split()):
            out.append(f"has {len(np.atleast_1d(values))} flag_values but {len(str(meanings).split())} flag_meanings")
    if var.values is not None and fits:
        unknown = sorted({text for text in map(_text, np.ravel(array.values)) if text not in var.values})
        if unknown:
            out.append(f"holds unknown value(s) {', '.join(map(repr, unknown))}; expected names from {', '.join(var.values)}")
    return out


def _all_numbers(array: xr.DataArray) -> bool:
    return all(isinstance(v, (int, float, bool, np.number, np.bool_)) for v in np.ravel(array.values))


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
