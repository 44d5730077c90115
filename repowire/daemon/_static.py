"""Map a ``/dashboard/<path>`` request onto a file inside the dashboard directory, safely."""

from __future__ import annotations

from pathlib import Path
from typing import Final

INDEX_FILE: Final = "index.html"

#: Cache-Control of every dashboard file the daemon serves. The names carry no content hash,
#: so browsers must revalidate (a cheap 304 with the ETag or Last-Modified) instead of keeping
#: a file for a while: after an upgrade the next load runs the new code. Hashing the names
#: would also work but needs a build step, and a custom dashboard export may not have one.
DASHBOARD_CACHE_CONTROL: Final = "no-cache"


def resolve_static(root: Path, subpath: str) -> Path | None:
    """The regular file under ``root`` that ``subpath`` names, or None.

    ``subpath`` is the already-decoded URL path below the dashboard prefix. It is refused
    (None) if any segment is empty, ``.``, ``..`` or hidden (starts with a dot), if it holds a
    backslash or NUL, or if the file it reaches -- after following symlinks -- lies outside
    ``root``. A directory (or a path ending in ``/``) serves its ``index.html``; a name
    without a file also tries ``<name>.html``, as static site exports lay pages out.
    """
    if "\x00" in subpath or "\\" in subpath:
        return None
    wants_directory = subpath.endswith("/")
    parts = subpath.removesuffix("/").split("/") if subpath not in ("", "/") else []
    if any(part == "" or part.startswith(".") for part in parts):
        return None
    try:
        base = root.resolve(strict=True)
    except OSError:
        return None
    candidates = []
    target = base.joinpath(*parts)
    if wants_directory or not parts:
        candidates.append(target / INDEX_FILE)
    else:
        candidates += [target, target / INDEX_FILE, target.with_name(target.name + ".html")]
    for candidate in candidates:
        try:
            resolved = candidate.resolve(strict=True)
        except (OSError, RuntimeError):
            # Missing, unreadable, or a symlink loop.
            continue
        if resolved.is_relative_to(base) and resolved.is_file():
            return resolved
    return None
