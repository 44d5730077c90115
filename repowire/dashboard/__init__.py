"""The dashboard's static export: HTML, CSS and JavaScript, with no build step.

The same files are served by the local daemon at ``/dashboard/`` and by the relay at
``/dashboard/`` and ``/d/<daemon_id>/dashboard/`` (the relay does not import this package:
``repowire relay start`` hands it :func:`static_dir` as ``RelaySettings.dashboard_dir``).
Every URL inside them is relative to the page's directory, so a server only has to map
``<prefix>/dashboard/<name>`` to ``static_dir() / <name>`` and serve ``index.html`` for the
directory itself. The page works under the Content-Security-Policy ``default-src 'self';
connect-src 'self'`` (no inline script or style, no external host).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["STATIC_DIR", "static_dir"]

STATIC_DIR: Path = Path(__file__).resolve().parent / "static"
"""The directory holding ``index.html`` and the assets it loads."""


def static_dir() -> Path:
    """Return the directory of the dashboard's static files (:data:`STATIC_DIR`).

    Raises FileNotFoundError, naming the directory, when it or its ``index.html`` is missing
    (a broken installation), so a server fails at startup instead of answering 404 later.
    """
    index = STATIC_DIR / "index.html"
    if not index.is_file():
        raise FileNotFoundError(f"the dashboard's static files are missing: no {index}")
    return STATIC_DIR
