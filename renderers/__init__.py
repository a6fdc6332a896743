"""Built-in renderers: figures drawn from probe datasets, never from models."""
