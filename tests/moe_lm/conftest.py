import os
import subprocess
import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def run_in_interpreter() -> Callable[[str], None]:
    """Runs a script in a fresh Python with Triton's interpreter on (TRITON_INTERPRET is read at import,
    so it cannot be switched on in this process) and asserts that it printed exactly "ok"."""
    pytest.importorskip("triton")

    def run(script: str) -> None:
        env = dict(os.environ, TRITON_INTERPRET="1")
        result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]

    return run
