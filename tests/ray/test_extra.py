"""Without the ``ray`` extra, memryx.ray says which extra to install (runs without Ray)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
def test_import_without_ray_names_the_extra() -> None:
    script = (
        "import sys\n"
        "sys.modules['ray'] = None  # as if Ray were not installed\n"
        "import memryx\n"
        "try:\n"
        "    import memryx.ray\n"
        "except ImportError as e:\n"
        "    print('OK', e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "OK" in out.stdout
    assert "pip install 'memryx[ray]'" in out.stdout
