"""``docs/datasets.md``: its schema sections are generated from the probes' schemas, the
prose around them is written by hand.

Each section sits between ``<!-- schema: PROBE -->`` (``PROBE.FORM`` for a probe's other
form) and ``<!-- /schema -->``; rewrite
them all with::

    python -m probescope.datasets_page docs/datasets.md
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from probescope.schema import DatasetSchema


_SECTION = re.compile(r"(<!-- schema: (?P<probe>[\w.-]+) -->\n).*?(<!-- /schema -->)", re.S)


def builtin_schemas() -> dict[str, DatasetSchema]:
    """The schemas of the probes probescope ships, by probe name; a probe's other forms
    (:attr:`probescope.Probe.forms`) as ``PROBE.FORM``."""
    from probescope.plugins.manager import load_registry

    entries = load_registry().entries["probe"]
    out = {}
    for name, e in sorted(entries.items()):
        if e.origin.package == "probescope" and getattr(e.obj, "schema", None) is not None:
            out[name] = e.obj.schema
            out.update({f"{name}.{form}": schema for form, schema in getattr(e.obj, "forms", {}).items()})
    return out


#: The model and results folder the page's examples read; the test that runs the page's
#: Python blocks writes every built-in probe's dataset there first.
EXAMPLE_RESULTS = "results"
EXAMPLE_MODEL = "gpt2"


def example_entry(section: str) -> str:
    """The probe entry a section's example opens: the probe's name, or for a probe's
    other form (``PROBE.FORM``) an entry named ``PROBE_FORM`` made with ``form = "FORM"``."""
    return section.replace(".", "_")


def reading_example(probe: str) -> str:
    """The Python block that ends each probe's section: how to open its dataset (the
    section's other examples use the ``ds`` it opens)."""
    entry = example_entry(probe)
    what = f"the `{entry}` entry" if entry == probe else \
        f'the `{entry}` entry, made with `form = "{probe.partition(".")[2]}"`,'
    return (f"Open one (a run writes `DIR/MODEL/ENTRY.nc`; here {what} of the model "
            f"`{EXAMPLE_MODEL}`):\n\n```python\nimport probescope\n\n"
            f'ds = probescope.load("{EXAMPLE_RESULTS}/{EXAMPLE_MODEL}/{entry}.nc")   # xarray.open_dataset reads it too\n'
            "```\n")


def update_page(page: str, schemas: Mapping[str, DatasetSchema] | None = None) -> str:
    """``page`` with every ``<!-- schema: NAME -->`` ... ``<!-- /schema -->`` section
    rewritten from the schema of probe NAME, followed by how to open such a dataset.

    :raises KeyError: a section names a probe without a schema.
    """
    schemas = builtin_schemas() if schemas is None else schemas

    def section(match: re.Match) -> str:
        schema = schemas[match["probe"]]
        return f"{match[1]}{schema.markdown()}\n\n{reading_example(match['probe'])}{match[3]}"

    return _SECTION.sub(section, page)


def sections(page: str) -> list[str]:
    """The probe names whose schema sections ``page`` holds, in order."""
    return [m["probe"] for m in _SECTION.finditer(page)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m probescope.schema PAGE``: rewrite PAGE's schema sections in place."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m probescope.datasets_page docs/datasets.md\n")
        return 2
    path = Path(args[0])
    path.write_text(update_page(path.read_text()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
