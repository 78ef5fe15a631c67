"""The lint gates: `ruff check` (rules in ruff.toml) and `mypy` (mypy.ini) find nothing in the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.contract.conftest import REPO


def test_ruff_check_finds_nothing() -> None:
    # The ruff of this interpreter's environment (requirements-dev.txt pins it), so the rules
    # mean the same on every machine.
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), f"{ruff} is missing: install requirements-dev.txt (./setup.sh --dev)"
    done = subprocess.run([str(ruff), "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_mypy_finds_nothing() -> None:
    # The files and settings are mypy.ini's; the pinned mypy of this environment.
    mypy = Path(sys.executable).parent / "mypy"
    assert mypy.exists(), f"{mypy} is missing: install requirements-dev.txt (./setup.sh --dev)"
    done = subprocess.run([str(mypy), "--no-error-summary"], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
