"""docs/hooks.md and docs/config-reference.md are generated from the code; they must match it."""

from pathlib import Path

from probescope import reference_pages
from probescope.plugins.manager import load_registry

ROOT = Path(__file__).resolve().parent.parent


def test_hook_reference_is_generated_from_the_hookspecs():
    page = (ROOT / "docs" / "hooks.md").read_text()
    assert page == reference_pages.hooks_page(), (
        "docs/hooks.md is out of date: run `python -m probescope.reference_pages hooks > docs/hooks.md`")
    for hook in ("register_probes", "register_renderers", "register_architectures", "dataset_produced",
                 "run_finished"):
        assert f"## `{hook}`" in page


def test_config_reference_is_generated_from_the_schemas():
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert page == reference_pages.config_page(load_registry()), (
        "docs/config-reference.md is out of date: run "
        "`python -m probescope.reference_pages config > docs/config-reference.md`")
    for name in ("token_similarity", "component_norm", "head_classifier", "similarity_grid"):
        assert f"`{name}`" in page
