"""Architecture adapters: one per model family, mapping its modules to canonical sites.

The adapters for individual families live in their own modules and are registered as
plugins (entry-point group ``probescope``) exactly like third-party adapters.
"""

from probescope.architectures.base import (
    ArchitectureAdapter,
    BlockListAdapter,
    Site,
    SiteRef,
    attention,
    component,
    embed,
    head_output,
    logits,
    mlp_hidden,
    resid,
    resid_final,
    resid_mid,
    rotary_k,
    rotary_q,
)

__all__ = ["ArchitectureAdapter", "BlockListAdapter", "Site", "SiteRef", "attention", "component", "embed",
           "head_output", "logits", "mlp_hidden", "resid", "resid_final", "resid_mid", "rotary_k", "rotary_q"]
