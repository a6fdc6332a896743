"""Logit lens for probescope: the ``logit_lens`` probe and the ``logit_lens_map`` renderer."""
