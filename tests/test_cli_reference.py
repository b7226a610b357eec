"""docs/CLI.md is the generated `--help` of every command and must match the code."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cli_reference.py"


def _load():
    spec = importlib.util.spec_from_file_location("cli_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_reference_is_up_to_date():
    ref = _load()
    text = ref.reference()
    for cmd in ("## cryosift run", "## cryosift report", "## cryosift denoise apply",
                "## cryosift screen train", "## cryosift classify", "## cryosift demo"):
        assert cmd in text
    assert ref.DOC.read_text(encoding="utf-8") == text, (
        "docs/CLI.md is stale: run python scripts/cli_reference.py"
    )
