"""The committed spec reference must match the schema it is generated from."""

from pathlib import Path

from training.reference import render

ROOT = Path(__file__).resolve().parents[2]


def test_spec_reference_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "spec-reference.md").read_text()
    assert committed == render(), "docs/spec-reference.md is stale: run `python -m training.reference > docs/spec-reference.md`"


def test_reference_documents_every_optimizer_and_schedule() -> None:
    text = render()
    for name in ("### SGD", "### Adam", "### AdamW", "### RMSprop", "### CosineRestarts", "### OneCycle", "### EarlyStoppingSpec"):
        assert name in text
    assert "`first_decay_steps`" in text and "`beta_1`" in text
