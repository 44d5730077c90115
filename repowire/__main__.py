"""``python -m repowire``: the same as the ``repowire`` command."""

from __future__ import annotations

from repowire.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
