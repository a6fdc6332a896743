"""Attention scores per layer and head for probescope: a probe and a renderer."""
