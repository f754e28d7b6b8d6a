"""Entry point of ``python -m batchsync.demo``."""

from __future__ import annotations

try:
    from ._cli import main
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise SystemExit(f"the demo needs its extra: pip install -e '.[demo]' ({exc})") from exc

if __name__ == "__main__":
    raise SystemExit(main())
