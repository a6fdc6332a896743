"""Built-in probes, each an ordinary plugin declared in the ``probescope`` entry-point group."""
