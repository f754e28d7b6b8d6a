"""The stand-alone example runs and shows the cure: far fewer queries, the same pages."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "n_plus_one.py"


def test_n_plus_one_example() -> None:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=30, check=False
    )
    assert proc.returncode == 0, proc.stderr  # it asserts the pages are identical itself
    naive = int(re.search(r"naive: +(\d+) queries", proc.stdout).group(1))  # type: ignore[union-attr]
    batched = re.search(r"batched: (\d+) queries for (\d+) loads", proc.stdout)
    assert batched is not None, proc.stdout
    assert naive == 320
    assert int(batched.group(2)) == 320
    assert int(batched.group(1)) <= naive / 10
