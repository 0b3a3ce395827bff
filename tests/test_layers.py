"""The package's architecture holds: import-linter's contracts in .importlinter (layers, no cycles)."""

from __future__ import annotations

from importlinter.cli import lint_imports

from tests.fakes import REPO


def test_the_layers_and_no_cycles_contracts_are_kept() -> None:
    """What `make lint` checks, here too so that CI holds the line: no upward import, no cycle."""
    assert lint_imports(config_filename=str(REPO / ".importlinter"), no_cache=True, no_logo=True) == 0
