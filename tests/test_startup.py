"""``probescope --help``, ``--version`` and the plugin listing start without the heavy
libraries: importing torch, transformers, nnsight and matplotlib takes seconds, and none of
them is needed to print help, a version or a list of names.

Each check runs the command's own code in a fresh interpreter and asserts which modules it
loaded (never how long it took: timings on a shared machine are noise).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "nnsight", "matplotlib", "xarray")


def loaded_after(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; return which HEAVY modules it left in sys.modules
    and what it printed."""
    script = (
        "import contextlib, io, json, sys\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):\n"
        "    try:\n"
        + "".join(f"        {line}\n" for line in code.splitlines())
        + "    except SystemExit as exc:\n"
        "        status = exc.code\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "print(json.dumps({'heavy': heavy, 'out': out.getvalue()}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv, expect", [
    (["--help"], "usage: probescope"),
    (["--version"], "probescope "),
    (["run", "--help"], "usage: probescope run"),
])
def test_help_and_version_load_no_heavy_library(argv, expect):
    result = loaded_after(f"from probescope.cli import main\nmain({argv!r})")
    assert expect in result["out"]
    assert result["heavy"] == []


def test_importing_probescope_loads_nothing_heavy_until_a_name_is_used():
    result = loaded_after("import probescope\nassert 'run' in dir(probescope)")
    assert result["heavy"] == []
    # Plugin base classes come without their libraries; the run API brings what it runs with.
    assert loaded_after("import probescope\nprobescope.Probe\nprobescope.Renderer")["heavy"] == []
    assert "xarray" in loaded_after("import probescope\nprobescope.load")["heavy"]


@pytest.mark.parametrize("argv, expect", [
    (["plugins"], "token_similarity"),
    (["plugins", "head_classifier"], "threshold"),
    (["plugins", "component_heatmap"], "cmap"),
    (["schema"], "probescope"),
])
def test_plugin_listing_and_schema_load_no_heavy_library(argv, expect):
    """Listing imports every plugin module (built-ins through their entry points): none of
    them may import torch, xarray or matplotlib before its code runs."""
    result = loaded_after(f"from probescope.cli import main\nmain({argv!r})")
    assert expect in result["out"]
    assert result["heavy"] == []


def test_lazy_import_imports_on_first_attribute_read():
    result = loaded_after(
        "from probescope import lazy_import\n"
        "xr = lazy_import('xarray')\n"
        "import sys\n"
        "assert 'xarray' not in sys.modules\n"
        "print(xr.Dataset.__name__)"
    )
    assert result["heavy"] == ["xarray"]
    assert "Dataset" in result["out"]


def test_every_public_name_resolves_to_its_definition():
    import probescope
    from probescope import probe, renderer

    assert probescope.Probe is probe.Probe
    assert probescope.Renderer is renderer.Renderer
    assert callable(probescope.progress)  # the function, never its module of the same name
    for name in probescope.__all__:
        assert getattr(probescope, name) is not None, name
    with pytest.raises(AttributeError, match="no_such_name"):
        probescope.no_such_name
