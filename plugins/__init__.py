"""The plugin contract of probescope.

- :mod:`probescope.plugins.hookspecs`: what a plugin may implement (read it as documentation);
- :mod:`probescope.plugins.manager`: how plugins are found (the ``probescope`` entry-point
  group), loaded, and turned into the registry of probes, renderers and architectures.
"""

from probescope.plugins.hookspecs import hookimpl, hookspec

__all__ = ["hookimpl", "hookspec"]
