"""Plugin parameters: the schema base class, paths relative to the config file, and the
validators every plugin's schema shares.

A probe or renderer declares its parameters as a subclass of :class:`Parameters` (a
pydantic model). The configuration is validated with :func:`validation_context`, so a
:data:`ConfigPath` parameter is taken relative to the folder of the config file. This
module imports nothing else of probescope's, so the configuration, probes and renderers
can all stand on it without importing each other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Mapping, Optional, Sequence, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationInfo


class Parameters(BaseModel):
    """Base of every plugin's parameter schema: unknown keys are errors, not ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def validation_context(base_dir: Optional[Path] = None) -> dict[str, Any]:
    """The pydantic ``context`` to validate parameters with: relative :data:`ConfigPath`
    values are taken from ``base_dir`` (the config file's folder), else the working
    directory."""
    return {"base_dir": base_dir if base_dir is not None else Path.cwd()}


def _relative_to_config(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    return path if path.is_absolute() or base is None else Path(base) / path


#: A file or folder named in a plugin's parameters: relative paths are taken from the
#: folder of the config file (from the working directory for configs given as dicts).
ConfigPath = Annotated[Path, AfterValidator(_relative_to_config)]


def distinct(values: Optional[Sequence[Any]]) -> Optional[Sequence[Any]]:
    """A list parameter's validator: None (take the default), or at least one value and
    none listed twice. Use it in a ``field_validator``::

        @field_validator("layers", "components")
        @classmethod
        def _distinct(cls, values):
            return probescope.distinct(values)
    """
    if values is None:
        return None
    if not values:
        raise ValueError("give at least one, or leave the key out for all of them")
    seen: list[Any] = []
    repeated: list[str] = []
    for value in values:
        if value in seen and str(value) not in repeated:
            repeated.append(str(value))
        seen.append(value)
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    return values


P = TypeVar("P", bound=Parameters)


def coerce_parameters(schema: type[P], params: Any) -> P:
    """``params`` as ``schema``: None gives the defaults, a mapping is validated, another
    plugin's :class:`Parameters` is re-validated field by field."""
    if params is None:
        return schema()
    if isinstance(params, schema):
        return params
    if isinstance(params, Mapping):
        return schema.model_validate(dict(params), context=validation_context())
    if isinstance(params, BaseModel):
        return schema.model_validate(params.model_dump(), context=validation_context())
    raise TypeError(f"params must be {schema.__name__} or a mapping, not {type(params).__name__}")
