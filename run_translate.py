"""Placeholder: this entry point is not built yet (see the open issues). It refuses to run rather than pretend."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    print("run_translate.py is not implemented yet in this version of the codebase; nothing was run.", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
