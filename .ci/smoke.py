"""Packaging smoke test: build the sdist and the wheel, install the wheel in a fresh venv, use it.

    python .ci/smoke.py        # from the checkout, with `build` installed (the test extra has it)

Everything happens in a temporary directory, removed at the end whatever happens. The check
runs outside the checkout, so it imports the installed wheel, not the source tree; it
exits non-zero, naming what is wrong, if the package does not install or work.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHECK = r"""
import importlib.metadata as md
import pathlib
import batchsync
from batchsync import Batcher

assert "site-packages" in batchsync.__file__, batchsync.__file__
calls = []

def double(keys):
    calls.append(list(keys))
    return [k * 2 for k in keys]

with Batcher(double, name="smoke") as b:
    assert b.get_many([1, 2, 3]) == [2, 4, 6]
    assert b.load(5).result(timeout=5) == 10
assert calls[0] == [1, 2, 3], calls
meta = md.metadata("batchsync")
assert meta["Version"] == batchsync.__version__, (meta["Version"], batchsync.__version__)
assert meta["License"] == "MIT" or meta.get("License-Expression") == "MIT", meta["License"]
classifiers = meta.get_all("Classifier") or []
for v in ("3.10", "3.11", "3.12", "3.13"):
    assert f"Programming Language :: Python :: {v}" in classifiers, v
requires = md.requires("batchsync") or []
assert any(r.startswith("pgserver") and 'python_version < "3.13"' in r for r in requires), requires
assert any(r.startswith("waitress") and 'extra == "examples"' in r for r in requires), requires
files = {str(f) for f in md.files("batchsync") or []}
assert "batchsync/py.typed" in files, "py.typed is missing"
assert any(f.endswith("licenses/LICENSE") or f.endswith("/LICENSE") for f in files), files
print(f"smoke: batchsync {batchsync.__version__} from the wheel works ({len(files)} files)")
"""


def run(*command: str | Path, cwd: Path = ROOT) -> None:
    """Run `command`; show its output only when it fails (then stop the smoke test)."""
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, capture_output=True, text=True, check=False
    )
    if done.stdout.startswith("smoke:"):
        print(done.stdout, end="")
    if done.returncode != 0:
        print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
        raise SystemExit(f"smoke: failed ({done.returncode}): {' '.join(map(str, command))}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="batchsync-smoke-") as tmp:
        out = Path(tmp) / "dist"
        run(sys.executable, "-m", "build", "--outdir", out, ROOT)
        sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
        if len(sdists) != 1 or len(wheels) != 1:
            print(f"smoke: expected one sdist and one wheel, got {sdists + wheels}")
            return 1
        with tarfile.open(sdists[0]) as sdist:
            names = sdist.getnames()
        top = names[0].split("/")[0]
        for needed in ("LICENSE", "README.md", "setup.cfg", "batchsync/py.typed"):
            if f"{top}/{needed}" not in names:
                print(f"smoke: the sdist lacks {needed}")
                return 1
        with zipfile.ZipFile(wheels[0]) as wheel:
            if any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in wheel.namelist()):
                print("smoke: the wheel holds more than the package")
                return 1
        venv = Path(tmp) / "venv"
        run(sys.executable, "-m", "venv", venv)
        python = venv / "bin" / "python"
        run(python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", wheels[0])
        run(python, "-c", CHECK, cwd=Path(tmp))  # outside the checkout: the wheel is imported
    return 0


if __name__ == "__main__":
    sys.exit(main())
