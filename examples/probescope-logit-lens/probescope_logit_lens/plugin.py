"""The entry point probescope loads (``[project.entry-points.probescope]`` in
``pyproject.toml``): registers the ``logit_lens`` probe and the ``logit_lens_map`` renderer."""

import probescope
from probescope_logit_lens.figure import LogitLensMap
from probescope_logit_lens.lens import LogitLens


@probescope.hookimpl
def register_probes(register):
    register(LogitLens())


@probescope.hookimpl
def register_renderers(register):
    register(LogitLensMap())
