"""`python -m bench [NAME ...]`: runs every benchmark module (or the named ones) in turn."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path


def available() -> list[str]:
    here = Path(__file__).parent
    return sorted(
        m.name
        for m in pkgutil.iter_modules([str(here)])
        if not m.name.startswith("_") and hasattr(importlib.import_module(f"bench.{m.name}"), "main")
    )


def main() -> int:
    names = sys.argv[1:] or available()
    unknown = set(names) - set(available())
    if unknown:
        print(f"unknown benchmarks {sorted(unknown)}; available: {available()}", file=sys.stderr)
        return 2
    for name in names:
        print(f"\n=== bench {name} ===", flush=True)
        importlib.import_module(f"bench.{name}").main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
