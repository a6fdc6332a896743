"""Documentation generated from code must match the code."""

from pathlib import Path

from probescope.architectures import table

ROOT = Path(__file__).resolve().parent.parent


def test_architecture_page_is_generated_from_the_adapters():
    page = (ROOT / "docs" / "architectures.md").read_text()
    assert page == table.page(), (
        "docs/architectures.md is out of date: run "
        "`python -m probescope.architectures.table > docs/architectures.md`"
    )


def test_architecture_page_lists_every_claimed_family():
    names = {adapter.name for adapter in table.builtin_adapters()}
    assert names == {"gpt2", "gpt_neox", "phi", "llama", "mistral", "qwen2", "gemma", "gemma2",
                     "gptj", "opt", "phi3", "qwen2_vl"}
    page = table.page()
    for name in names:
        assert f"## `{name}`" in page
