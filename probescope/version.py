"""The version of probescope, in a module of its own so that the modules recording it in
datasets and printing it do not import the package's public face (and everything it
re-exports)."""

__version__ = "0.1.0"
