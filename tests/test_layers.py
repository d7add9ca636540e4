"""Layer contracts (issue 10): ``lint-imports`` checks the contracts of ``.importlinter`` over
the whole source tree (function-level imports included): config is a leaf; the engine imports no
service package; store imports none of training, orchestration, api, worker (with no exception:
the sweep decisions live in orchestration); orchestration imports neither api nor worker; api
imports neither worker nor torch; client (what a batch script imports) imports nothing of the
server (its entry point adds server.cli's commands when it runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def _lint(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_layer_contracts_are_kept():
    out = _lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 7 kept, 0 broken." in out.stdout, out.stdout
    assert "store imports none of training, orchestration, api, worker, client KEPT\n" in out.stdout, out.stdout


def test_a_broken_contract_fails_the_check(tmp_path):
    # the tool is not vacuous: a contract the code does break (the API reads rows) is reported
    config = tmp_path / "broken.ini"
    config.write_text("[importlinter]\nroot_packages =\n    api\n    store\n\n"
                      "[importlinter:contract:x]\nname = api imports no store\ntype = forbidden\n"
                      "source_modules = api\nforbidden_modules = store\n")
    out = _lint("--config", str(config))
    assert out.returncode == 1 and "api imports no store BROKEN" in out.stdout, out.stdout
