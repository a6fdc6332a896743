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


def test_every_configuration_key_says_what_it_is():
    """Each section and each key of the file's own sections has a description, which the
    config reference, ``probescope schema`` (editors show it on hover) and error
    messages' readers rely on."""
    from probescope.config import Include, Inputs, ModelEntry, Output, ProbeEntry, RendererEntry, RunConfig
    from probescope.config_schema import config_schema

    missing = [f"{model.__name__}.{key}" for model in (RunConfig, Include, ModelEntry, Inputs, ProbeEntry,
                                                         RendererEntry, Output)
               for key, field in model.model_fields.items() if not field.description]
    assert missing == []
    schema = config_schema(load_registry())
    assert all(section.get("description") for section in schema["properties"].values())
    assert schema["$defs"]["ModelEntry"]["properties"]["hub"]["description"].startswith("a Hugging Face hub id")
    page = (ROOT / "docs" / "config-reference.md").read_text()
    assert "## `[[models]]`\n\nThe models to probe, one table each.\n" in page
