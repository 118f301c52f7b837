"""The code stays lint-clean (ruff, configured in pyproject.toml)."""

import subprocess
import sys

from support.stack import ROOT


def test_ruff_is_clean():
    paths = [p for p in ("fusion_celery", "tests", "examples", "bench") if (ROOT / p).is_dir()]
    out = subprocess.run([sys.executable, "-m", "ruff", "check", *paths], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
