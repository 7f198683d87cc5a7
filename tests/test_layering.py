"""The package layering (`[tool.importlinter]` in pyproject.toml) holds: no upward imports."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_import_contracts_are_kept():
  exe = shutil.which("lint-imports") or os.path.join(os.path.dirname(sys.executable),
                                                     "lint-imports")
  out = subprocess.run([exe, "--config", os.path.join(ROOT, "pyproject.toml")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
  assert "KEPT" in out.stdout
