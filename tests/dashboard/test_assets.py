"""Static checks of the dashboard export, and its pure JavaScript logic run under node.

The same files are served at three kinds of place (the local daemon, the relay's root, and the
relay's ``/d/<daemon_id>/``), so every URL must be relative and must land on the right route
from each of them. The page must also work under ``default-src 'self'; connect-src 'self'``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import pytest

import repowire.dashboard as dashboard
from tests.support.system import needs

STATIC = dashboard.STATIC_DIR
HARNESS = Path(__file__).with_name("core_harness.mjs")
SCENARIOS = Path(__file__).with_name("app_scenarios.mjs")
JS_FILES = ("app.js", "core.js")
TEXT_ASSETS = ("index.html", "app.css", *JS_FILES)

LOCAL = "http://localhost:48377/dashboard/"
RELAY_ROOT = "https://relay.example/dashboard/"
RELAY_DAEMON = "https://relay.example/d/laptop-1/dashboard/"
# Each page URL, and the path prefix its tunneled API calls must carry.
PAGES = {LOCAL: "", RELAY_ROOT: "", RELAY_DAEMON: "/d/laptop-1"}

EXPECTED_ROUTES = {
    "health": "/health",
    "peers": "/peers",
    "events": "/events",
    "eventStream": "/events/stream",
    "ws": "/ws",
    "notify": "/notify",
    "daemons": "/api/v1/daemons",
}


def read(name: str) -> str:
    return (STATIC / name).read_text(encoding="utf-8")


# --------------------------------------------------------------------------------------------
# HTML model


class Page(HTMLParser):
    """Collects the elements of index.html with their attributes and inline content."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.inline: dict[int, str] = {}  # index in elements -> text inside script/style
        self._open: list[int] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, {name: value or "" for name, value in attrs}))
        if tag in ("script", "style", "button", "label", "a"):
            self._open.append(len(self.elements) - 1)

    def handle_endtag(self, tag: str) -> None:
        if self._open and self.elements[self._open[-1]][0] == tag:
            self._open.pop()

    def handle_data(self, data: str) -> None:
        for index in self._open:
            self.inline[index] = self.inline.get(index, "") + data

    def text_of(self, index: int) -> str:
        return self.inline.get(index, "").strip()

    def find(self, tag: str) -> list[tuple[int, dict[str, str]]]:
        return [(i, attrs) for i, (name, attrs) in enumerate(self.elements) if name == tag]

    def ids(self) -> list[str]:
        return [attrs["id"] for _, attrs in self.elements if "id" in attrs]


URL_ATTRIBUTES = ("href", "src", "action", "formaction", "srcset", "poster", "data", "cite")


@pytest.fixture(scope="module")
def page() -> Page:
    parser = Page()
    parser.feed(read("index.html"))
    parser.close()
    return parser


def html_urls(page: Page) -> Iterator[tuple[str, str, str]]:
    """(tag, attribute, url) for every URL-bearing attribute of index.html."""
    for tag, attrs in page.elements:
        for name in URL_ATTRIBUTES:
            if name in attrs:
                yield tag, name, attrs[name]


# --------------------------------------------------------------------------------------------
# A small JavaScript lexer: enough to find string literals and skip comments and regexes


def js_strings(source: str) -> list[str]:
    """Every string literal of `source`; a template's ``${...}`` parts read as ``X``."""
    strings: list[str] = []
    i, n = 0, len(source)
    last = ""  # last significant character of code, to tell a regex from a division
    while i < n:
        c = source[i]
        if source.startswith("//", i):
            i = source.find("\n", i)
            i = n if i < 0 else i
        elif source.startswith("/*", i):
            i = source.index("*/", i) + 2
        elif c in "'\"":
            end = i + 1
            while source[end] != c:
                end += 2 if source[end] == "\\" else 1
            strings.append(source[i + 1 : end])
            i, last = end + 1, "a"
        elif c == "`":
            text, end = [], i + 1
            while source[end] != "`":
                if source[end] == "\\":
                    text.append(source[end : end + 2])
                    end += 2
                elif source.startswith("${", end):
                    depth, end = 1, end + 2
                    while depth:
                        depth += {"{": 1, "}": -1}.get(source[end], 0)
                        end += 1
                    text.append("X")
                else:
                    text.append(source[end])
                    end += 1
            strings.append("".join(text))
            i, last = end + 1, "a"
        elif c == "/" and (last == "" or last in "(,=:[!&|?{};+-*%<>~^"):
            end, in_class = i + 1, False
            while in_class or source[end] != "/":
                if source[end] == "\\":
                    end += 1
                elif source[end] == "[":
                    in_class = True
                elif source[end] == "]":
                    in_class = False
                end += 1
            i, last = end + 1, "a"
        else:
            if not c.isspace():
                last = c
            i += 1
    return strings


def test_lexer_finds_strings_and_skips_comments_and_regexes() -> None:
    source = (
        '// a \'comment\'\nconst a = "x\\"y"; /* "no" */ const r = /[/"]\\//.test(\'z\');\n'
        "const t = `../${id}/dashboard/`; const d = 4 / 2 / 1;"
    )
    assert js_strings(source) == ['x\\"y', "z", "../X/dashboard/"]


# --------------------------------------------------------------------------------------------
# The package


def test_static_dir_is_the_directory_with_the_page() -> None:
    assert dashboard.static_dir() == dashboard.STATIC_DIR
    assert (dashboard.static_dir() / "index.html").is_file()


def test_static_dir_reports_a_missing_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "STATIC_DIR", tmp_path / "static")
    with pytest.raises(FileNotFoundError, match="static files are missing"):
        dashboard.static_dir()


# --------------------------------------------------------------------------------------------
# Assets


def js_imports(name: str) -> list[str]:
    return re.findall(
        r"""^\s*(?:import|export)\b[^;]*?\bfrom\s+["']([^"']+)["']""", read(name), re.M
    )


def test_every_asset_referenced_exists_and_nothing_else_ships(page: Page) -> None:
    referenced: set[str] = set()
    for tag, attr, url in html_urls(page):
        if url.startswith("#") or attr == "action":
            continue
        target = urljoin(LOCAL, url)
        assert target.startswith(LOCAL), f"<{tag} {attr}={url!r}> leaves the dashboard directory"
        referenced.add(target.removeprefix(LOCAL))
    for name in JS_FILES:
        for spec in js_imports(name):
            assert spec.startswith("./"), f"{name} imports {spec!r}: use a ./ relative path"
            referenced.add(spec.removeprefix("./"))
    assert {"app.css", "app.js", "core.js", "favicon.svg"} <= referenced
    for name in referenced:
        assert (STATIC / name).is_file(), f"{name} is referenced but missing"
    shipped = {path.name for path in STATIC.iterdir()}
    assert shipped - referenced == {"index.html"}


def test_scripts_and_styles_are_external_files(page: Page) -> None:
    scripts = page.find("script")
    assert scripts, "index.html loads no script"
    for index, attrs in scripts:
        assert attrs.get("src"), "inline <script> is blocked by the Content-Security-Policy"
        assert page.text_of(index) == ""
        assert attrs.get("type") == "module"
    assert page.find("style") == []
    for tag, attrs in page.elements:
        assert "style" not in attrs, f"<{tag}> has a style attribute"
        handlers = [name for name in attrs if name.startswith("on")]
        assert handlers == [], f"<{tag}> has inline handlers {handlers}"
        for value in attrs.values():
            assert not value.strip().lower().startswith("javascript:")


def test_page_declares_a_strict_content_security_policy(page: Page) -> None:
    metas = [a for _, a in page.find("meta") if a.get("http-equiv") == "Content-Security-Policy"]
    assert len(metas) == 1
    policy = {
        part.split()[0]: part.split()[1:] for part in metas[0]["content"].split(";") if part.strip()
    }
    assert policy["default-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    assert all("unsafe" not in source for sources in policy.values() for source in sources)


# --------------------------------------------------------------------------------------------
# URLs


def core_routes() -> dict[str, str]:
    block = re.search(r"export const ROUTES = Object\.freeze\(\{(.*?)\}\);", read("core.js"), re.S)
    assert block is not None, "core.js must define ROUTES"
    return dict(re.findall(r'(\w+):\s*"([^"]*)"', block.group(1)))


def assert_relative(url: str, where: str) -> None:
    assert not url.startswith("/"), f"{where}: {url!r} is absolute-path (breaks under /d/<id>/)"
    assert not re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", url), f"{where}: {url!r} has a scheme"


def test_routes_are_exactly_the_daemon_and_relay_api() -> None:
    assert core_routes().keys() == EXPECTED_ROUTES.keys()


@pytest.mark.parametrize("page_url", PAGES)
def test_routes_land_on_the_api_from_every_page(page_url: str) -> None:
    prefix = PAGES[page_url]
    for name, route in core_routes().items():
        assert_relative(route, f"ROUTES.{name}")
        target = urlsplit(urljoin(page_url, route))
        assert target.netloc == urlsplit(page_url).netloc
        assert target.path == prefix + EXPECTED_ROUTES[name], name


@pytest.mark.parametrize("page_url", PAGES)
def test_html_urls_are_relative_and_land_where_meant(page: Page, page_url: str) -> None:
    for tag, attr, url in html_urls(page):
        assert_relative(url, f"<{tag} {attr}>")
        target = urlsplit(urljoin(page_url, url))
        assert target.netloc == urlsplit(page_url).netloc
        if url.startswith("#"):
            assert url[1:] in page.ids(), f"{url} targets no element"
        elif attr == "action":
            assert target.path == PAGES[page_url] + "/logout"
        else:
            assert target.path == urlsplit(page_url).path + url


def test_logout_is_a_post_form_hidden_until_the_relay_is_seen(page: Page) -> None:
    forms = [attrs for _, attrs in page.find("form") if attrs.get("action")]
    assert [f["action"] for f in forms] == ["../logout"]
    assert forms[0]["method"].lower() == "post"
    assert "hidden" in forms[0]


# The path-like string literals of the JavaScript besides ROUTES, each checked elsewhere: the
# module import, and the pieces daemonHref and rootHref build links from (see the node tests).
KNOWN_JS_PATHS = {"./core.js", "../../X/dashboard/", "../d/X/dashboard/", "../../../", "../"}


@pytest.mark.parametrize("name", JS_FILES)
def test_js_string_literals_hold_no_absolute_or_unknown_url(name: str) -> None:
    known = KNOWN_JS_PATHS | set(core_routes().values())
    for literal in js_strings(read(name)):
        if re.search(r"\s", literal) or literal == "":
            continue  # prose, not a URL
        assert_relative(literal, name)
        assert not literal.startswith("//")
        if "/" in literal and literal.startswith("."):
            assert literal in known, f"{name}: unchecked path {literal!r}"


@pytest.mark.parametrize("name", [*TEXT_ASSETS, "favicon.svg"])
def test_no_external_host(name: str) -> None:
    text = read(name)
    if name == "favicon.svg":
        # The SVG namespace is an identifier, never fetched.
        text = text.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "://" not in text
    assert not re.search(r"""["'(]\s*//""", text), "protocol-relative URL"
    assert "@import" not in text
    if name == "app.css":
        assert "url(" not in text


# --------------------------------------------------------------------------------------------
# Safety of the JavaScript

FORBIDDEN_JS = {
    "innerHTML": r"\binnerHTML\b",
    "outerHTML": r"\bouterHTML\b",
    "insertAdjacentHTML": r"\binsertAdjacentHTML\b",
    "document.write": r"\bdocument\s*\.\s*write",
    "eval": r"\beval\s*\(",
    "Function constructor": r"\bFunction\s*\(",
    "string timer": r"\bset(?:Timeout|Interval)\s*\(\s*[\"'`]",
    "HTML parsing": r"\b(?:DOMParser|createContextualFragment|srcdoc)\b",
}


@pytest.mark.parametrize("name", [*JS_FILES, "index.html"])
def test_no_html_injection_or_eval(name: str) -> None:
    text = read(name)
    for what, pattern in FORBIDDEN_JS.items():
        assert not re.search(pattern, text), f"{name} uses {what}"


def test_app_uses_only_ids_present_in_the_page(page: Page) -> None:
    used = re.findall(r'byId\("([^"]+)"\)', read("app.js"))
    assert used, "app.js finds its elements with byId"
    missing = set(used) - set(page.ids())
    assert missing == set()


# --------------------------------------------------------------------------------------------
# Accessibility (static part)


def test_ids_are_unique_and_references_resolve(page: Page) -> None:
    ids = page.ids()
    assert len(ids) == len(set(ids))
    for tag, attrs in page.elements:
        for name in ("for", "list", "aria-labelledby", "aria-describedby", "aria-controls"):
            for ref in attrs.get(name, "").split():
                assert ref in ids, f"<{tag} {name}={ref!r}> points to nothing"


def test_every_field_has_a_label_and_every_button_a_name(page: Page) -> None:
    labelled = {attrs["for"] for _, attrs in page.find("label") if "for" in attrs}
    fields = [
        attrs
        for tag, attrs in page.elements
        if tag in ("input", "textarea", "select") and attrs.get("type") not in ("hidden",)
    ]
    assert len(fields) == 3
    for attrs in fields:
        assert attrs.get("id") in labelled or attrs.get("aria-label"), attrs
    for index, attrs in page.find("button"):
        assert page.text_of(index) or attrs.get("aria-label"), attrs


def test_status_and_results_are_announced(page: Page) -> None:
    by_id = {attrs.get("id"): attrs for _, attrs in page.elements}
    for name in ("banner", "notify-result"):
        assert by_id[name].get("aria-live") == "polite"
        assert by_id[name].get("role") == "status"


def test_page_is_ready_for_phones(page: Page) -> None:
    html = page.find("html")[0][1]
    assert html.get("lang") == "en"
    viewport = [a["content"] for _, a in page.find("meta") if a.get("name") == "viewport"]
    assert viewport and "width=device-width" in viewport[0]
    assert "user-scalable=no" not in viewport[0] and "maximum-scale" not in viewport[0]
    skip = [a for _, a in page.find("a") if a.get("href", "").startswith("#")]
    assert skip and skip[0] is page.find("a")[0][1], "the first link skips to the content"


# --------------------------------------------------------------------------------------------
# CSS: contrast and width


def css_blocks() -> tuple[dict[str, str], dict[str, str]]:
    """The light and dark custom properties of app.css."""
    css = re.sub(r"/\*.*?\*/", "", read("app.css"), flags=re.S)
    light = re.match(r"\s*:root\s*\{([^}]*)\}", css)
    dark = re.search(r"@media\s*\(prefers-color-scheme:\s*dark\)\s*\{\s*:root\s*\{([^}]*)\}", css)
    assert light is not None and dark is not None

    def props(body: str) -> dict[str, str]:
        return dict(re.findall(r"(--[\w-]+)\s*:\s*([^;]+);", body))

    light_props = props(light.group(1))
    return light_props, {**light_props, **props(dark.group(1))}


def luminance(hex_colour: str) -> float:
    value = hex_colour.lstrip("#")
    assert re.fullmatch(r"[0-9a-fA-F]{6}", value), hex_colour
    channels = [int(value[i : i + 2], 16) / 255 for i in (0, 2, 4)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_helper_matches_known_values() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)


# (foreground, background, minimum): text at 4.5:1; focus ring and field borders at 3:1.
COLOUR_PAIRS = [
    ("--fg", "--bg", 4.5),
    ("--fg", "--surface", 4.5),
    ("--muted", "--bg", 4.5),
    ("--muted", "--surface", 4.5),
    ("--accent", "--bg", 4.5),
    ("--accent", "--surface", 4.5),
    ("--on-accent", "--accent", 4.5),
    ("--ok-fg", "--ok-bg", 4.5),
    ("--warn-fg", "--warn-bg", 4.5),
    ("--bad-fg", "--bad-bg", 4.5),
    ("--neutral-fg", "--neutral-bg", 4.5),
    ("--fg", "--code-bg", 4.5),
    ("--focus", "--bg", 3.0),
    ("--focus", "--surface", 3.0),
    ("--border", "--bg", 3.0),
    ("--border", "--surface", 3.0),
    ("--bad-fg", "--bg", 3.0),
]


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_colour_pairs_have_enough_contrast(scheme: str) -> None:
    light, dark = css_blocks()
    colours = light if scheme == "light" else dark
    for fg, bg, minimum in COLOUR_PAIRS:
        ratio = contrast(colours[fg], colours[bg])
        assert ratio >= minimum, f"{scheme}: {fg} on {bg} is {ratio:.2f}:1"


def test_colours_are_only_set_through_the_checked_properties() -> None:
    css = re.sub(r"/\*.*?\*/", "", read("app.css"), flags=re.S)
    for line in css.splitlines():
        if re.search(r"#[0-9a-fA-F]{3,8}\b|\brgba?\(|\bhsla?\(", line):
            assert re.match(r"\s*--[\w-]+\s*:", line), f"colour outside a custom property: {line}"
    used = set(re.findall(r"var\((--[\w-]+)\)", css))
    light, dark = css_blocks()
    assert used <= light.keys() and used <= dark.keys()
    checked = {name for pair in COLOUR_PAIRS for name in pair[:2]}
    assert {name for name in used if name not in checked} == set()


def test_no_fixed_width_wider_than_a_phone() -> None:
    css = re.sub(r"/\*.*?\*/", "", read("app.css"), flags=re.S)
    css = re.sub(r"@media[^{]*\{", "{", css)  # media conditions are not widths
    for prop, value in re.findall(
        r"(?<![\w-])(width|min-width|flex-basis|grid-template-columns)"
        r"\s*:\s*([^;]+);",
        css,
    ):
        for number, unit in re.findall(r"(\d*\.?\d+)(px|rem|em)\b", value):
            pixels = float(number) * (1 if unit == "px" else 16)
            assert pixels < 320, f"{prop}: {value} does not fit 360 px"


# --------------------------------------------------------------------------------------------
# JavaScript under node


def find_node() -> str | None:
    found = shutil.which("node")
    if found is None and Path("/usr/bin/node").is_file():
        found = "/usr/bin/node"
    return found


NODE = find_node()
needs_node = needs("node", NODE is not None, "apt-get install nodejs")


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the scripts in a directory where node reads .js files as ES modules."""
    directory = tmp_path_factory.mktemp("dashboard")
    for name in (*JS_FILES, "index.html"):
        shutil.copy(STATIC / name, directory / name)
    (directory / "package.json").write_text('{"type": "module"}\n', encoding="utf-8")
    return directory


@needs_node
@pytest.mark.parametrize("name", JS_FILES)
def test_node_check(module_dir: Path, name: str) -> None:
    assert NODE is not None
    done = subprocess.run(
        [NODE, "--check", str(module_dir / name)], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr


def core(module_dir: Path, *calls: dict[str, Any]) -> list[Any]:
    """Run `calls` against core.js under node (see core_harness.mjs); return their results."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(HARNESS), str(module_dir / "core.js")],
        input=json.dumps({"calls": list(calls)}),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    results: list[Any] = json.loads(done.stdout)["results"]
    for call, result in zip(calls, results, strict=True):
        assert not (isinstance(result, dict) and "error" in result), (call, result)
    return results


def fn(name: str, *args: Any) -> dict[str, Any]:
    return {"fn": name, "args": list(args)}


@needs_node
@pytest.mark.parametrize("page_url", PAGES)
def test_core_builds_api_urls_that_land_on_the_routes(module_dir: Path, page_url: str) -> None:
    prefix = PAGES[page_url]
    names = list(EXPECTED_ROUTES)
    routes, *urls = core(
        module_dir,
        {"get": "ROUTES"},
        *[fn("apiUrl", core_routes()[name], page_url) for name in names],
        fn("eventsUrl", page_url, 5, 200),
        fn("wsUrl", page_url),
    )
    assert routes == core_routes()
    for name, url in zip(names, urls, strict=False):
        assert url == urljoin(page_url, prefix + EXPECTED_ROUTES[name])
    events, ws = urls[-2:]
    assert urlsplit(events).path == prefix + "/events"
    assert urlsplit(events).query == "after=5&limit=200"
    scheme = "wss" if page_url.startswith("https:") else "ws"
    assert ws == f"{scheme}://{urlsplit(page_url).netloc}{prefix}/ws"


RELAY_PAGES = {
    RELAY_ROOT: "",
    RELAY_DAEMON: "",
    "https://relay.example/d/laptop-1/dashboard/index.html": "",
    "https://relay.example/dashboard/index.html": "",
    # A relay mounted under a path prefix keeps working.
    "https://relay.example/rw/d/laptop-1/dashboard/": "/rw",
    "https://relay.example/rw/dashboard/": "/rw",
}


@needs_node
@pytest.mark.parametrize("page_url", RELAY_PAGES)
def test_daemon_and_root_links_land_on_the_relay(module_dir: Path, page_url: str) -> None:
    prefix = RELAY_PAGES[page_url]
    path = urlsplit(page_url).path
    shown, other, root, encoded = core(
        module_dir,
        fn("pageDaemonId", path),
        fn("daemonHref", path, "laptop-2"),
        fn("rootHref", path),
        fn("daemonHref", path, "a.b_c-D9"),
    )
    assert shown == ("laptop-1" if "/d/laptop-1/" in path else None)
    assert urljoin(page_url, other) == f"https://relay.example{prefix}/d/laptop-2/dashboard/"
    assert urljoin(page_url, root) == f"https://relay.example{prefix}/"
    assert urljoin(page_url, encoded) == f"https://relay.example{prefix}/d/a.b_c-D9/dashboard/"


@needs_node
def test_daemon_links_refuse_ids_that_would_escape_the_path(module_dir: Path) -> None:
    bad = ["", ".", "..", "a/b", "a b", "x" * 65, "%2e%2e", "é", "a?b", "a#b", None, 7]
    results = core(module_dir, *[fn("daemonHref", "/d/laptop-1/dashboard/", i) for i in bad])
    assert results == [None] * len(bad)
    page_ids = core(
        module_dir,
        fn("pageDaemonId", "/d/%2E%2E/dashboard/"),
        fn("pageDaemonId", "/d/a%2Fb/dashboard/"),
        fn("pageDaemonId", "/d/%E0%A4/dashboard/"),
        fn("pageDaemonId", "/d/laptop-1/dashboard/app.js"),
        fn("pageDaemonId", "/dashboard/"),
    )
    assert page_ids == [None] * 5


def event(event_id: int, kind: str = "message", time: float = 1.0) -> dict[str, Any]:
    return {"id": event_id, "type": kind, "time": time, "data": {}}


@needs_node
def test_event_buffer_dedupes_orders_and_bounds(module_dir: Path) -> None:
    ops = [
        ["add", event(1)],
        ["add", event(2)],
        ["add", event(2)],  # duplicate
        ["add", event(5)],
        ["add", event(3)],  # late: inserted in order, evicts 1
        ["add", event(0)],  # older than everything held in a full buffer
        ["add", {"id": "7", "type": "message"}],  # malformed
        ["add", {"id": 8}],  # malformed
        ["add", None],
        ["add", event(9)],
        ["newest"],
    ]
    (run,) = core(
        module_dir,
        {"new": "EventBuffer", "args": [3], "ops": ops, "props": ["events", "maxId"]},
    )
    added = run["results"]
    assert added[0] == {"index": 0, "evicted": []}
    assert added[2] is None
    assert added[4] == {"index": 1, "evicted": [event(1)]}
    assert added[5:9] == [None, None, None, None]
    assert added[9] == {"index": 2, "evicted": [event(2)]}
    assert added[10] == event(9)
    assert [e["id"] for e in run["props"]["events"]] == [3, 5, 9]
    assert run["props"]["maxId"] == 9


@needs_node
def test_event_buffer_clear_forgets_ids(module_dir: Path) -> None:
    ops = [["add", event(4)], ["clear"], ["add", event(1)], ["add", event(4)]]
    (run,) = core(
        module_dir, {"new": "EventBuffer", "args": [10], "ops": ops, "props": ["events", "maxId"]}
    )
    assert [e["id"] for e in run["props"]["events"]] == [1, 4]
    assert run["props"]["maxId"] == 4


@needs_node
def test_same_event_log_detects_a_restarted_daemon(module_dir: Path) -> None:
    newest = event(40, time=100.5)
    results = core(
        module_dir,
        fn("sameEventLog", newest, [event(40, time=100.5)]),
        fn("sameEventLog", newest, []),  # the log restarted and has fewer events
        fn("sameEventLog", newest, [event(40, time=7.0)]),  # a new log reached the same id
        fn("sameEventLog", newest, [event(41, time=101.0)]),  # moved on past what is shown
        fn("sameEventLog", newest, None),
    )
    assert results == [True, False, False, False, False]


@needs_node
def test_feed_falls_back_from_sse_to_websocket_to_polling(module_dir: Path) -> None:
    (settings,) = core(module_dir, {"get": "SETTINGS"})
    sse, ws = settings["sseMaxFailures"], settings["wsMaxFailures"]
    stable = settings["stableAfterMs"]
    ops: list[list[Any]] = [["failed", t] for t in range(sse)]
    ops += [["failed", 10 + t] for t in range(ws)]
    ops += [["failed", 20], ["daemonBack"]]
    (run,) = core(module_dir, {"new": "FeedPolicy", "args": [], "ops": ops, "props": ["mode"]})
    assert run["results"] == ["sse"] * (sse - 1) + ["ws"] * ws + ["poll", "poll", "sse"]

    # A feed that stays open long enough is forgiven its earlier failures; a flapping one is not.
    ops = [["failed", t] for t in range(sse - 1)]
    ops += [["opened", 10], ["failed", 10 + stable]]
    ops += [["opened", 20 + stable], ["failed", 21 + stable]] * (sse - 1)
    (run,) = core(module_dir, {"new": "FeedPolicy", "args": [], "ops": ops, "props": ["mode"]})
    modes = [mode for mode in run["results"] if mode is not None]
    assert modes == ["sse"] * (sse - 1) + ["sse"] + ["sse"] * (sse - 2) + ["ws"]


@needs_node
def test_retry_delay_is_jittered_capped_and_never_zero(module_dir: Path) -> None:
    (settings,) = core(module_dir, {"get": "SETTINGS"})
    calls = [fn("retryDelayMs", n, r) for n in (1, 2, 3, 10, 40) for r in (0, 0.5, 0.999)]
    delays = core(module_dir, *calls)
    assert min(delays) > 0
    assert max(delays) <= settings["retryCapMs"]
    low, mid, high = delays[0:3]
    assert low < mid < high <= settings["retryBaseMs"]
    assert delays[-1] > settings["retryCapMs"] * 0.99


@needs_node
def test_events_are_summarised_as_plain_text(module_dir: Path) -> None:
    hostile = '<img src=x onerror="alert(1)"> & <b>hi</b>'
    data = {"from": "a", "to": "b@laptop-2", "text": hostile, "via": "laptop-3"}
    message = {"id": 1, "type": "message", "time": 1.0, "data": data}
    joined = {"id": 2, "type": "peer_joined", "time": 1.0, "data": {"name": "<script>"}}
    other = {"id": 3, "type": "custom", "time": 1.0, "data": {"k": [1, 2]}}
    (settings,) = core(module_dir, {"get": "SETTINGS"})
    longer = {**message, "data": {"text": "x" * (settings["maxEventTextChars"] + 50)}}
    results = core(
        module_dir,
        fn("describeEvent", message),
        fn("describeEvent", joined),
        fn("describeEvent", other),
        fn("describeEvent", longer),
        fn("describeEvent", {"id": 4, "type": "message", "time": 1.0, "data": None}),
    )
    assert results[0] == {"title": "a → b@laptop-2 (via laptop-3)", "body": hostile}
    assert results[1] == {"title": "<script> joined", "body": ""}
    assert results[2] == {"title": "custom", "body": '{"k":[1,2]}'}
    assert len(results[3]["body"]) == settings["maxEventTextChars"]
    assert results[4]["title"] == "to (no recipient given)"


@needs_node
def test_relay_link_states_are_described(module_dir: Path) -> None:
    results = core(
        module_dir,
        fn("describeRelayLink", {"state": "connected", "rtt_ms": 12.6, "connected_since": 5.0}),
        fn("describeRelayLink", {"state": "connecting", "last_error": "refused"}),
        fn("describeRelayLink", {"state": "down", "last_error": "invalid key", "last_error_at": 9}),
        fn("describeRelayLink", {"state": "down"}),
        fn("describeRelayLink", {"state": "disabled"}),
        fn("describeRelayLink", None),
    )
    assert [r["state"] for r in results] == [
        "connected",
        "connecting",
        "down",
        "down",
        "disabled",
        "unknown",
    ]
    assert (results[0]["detail"], results[0]["since"]) == ("13 ms round trip", 5.0)
    assert (results[1]["detail"], results[1]["since"]) == ("last error: refused", None)
    assert (results[2]["detail"], results[2]["since"]) == ("invalid key", 9)
    assert results[3]["detail"] == "no error reported"
    assert results[4]["since"] is None


@needs_node
def test_failures_keep_the_precise_detail(module_dir: Path) -> None:
    offline = {"error": "daemon_offline", "detail": "The daemon laptop-1 is not connected."}
    results = core(
        module_dir,
        fn("describeFailure", 503, offline),
        fn("describeFailure", 404, {"error": "unknown_peer"}),
        fn("describeFailure", 502, None),
        fn("describeFailure", 0, None),
    )
    assert results[0] == {"code": "daemon_offline", "detail": offline["detail"]}
    assert results[1] == {"code": "unknown_peer", "detail": "The request failed (HTTP 404)."}
    assert results[2] == {"code": "http_502", "detail": "The request failed (HTTP 502)."}
    assert results[3]["code"] == "unreachable"


@needs_node
def test_send_form_values_are_checked_before_sending(module_dir: Path) -> None:
    def values(to: str, text: str = "hi", sender: str = "") -> dict[str, str]:
        return {"to": to, "text": text, "from": sender}

    results = core(
        module_dir,
        fn("validateNotify", values("alice")),
        fn("validateNotify", values("alice@laptop-2", sender="me")),
        fn("validateNotify", values("")),
        fn("validateNotify", values("al ice")),
        fn("validateNotify", values("a@b@c")),
        fn("validateNotify", values("alice", text="  \n")),
        fn("validateNotify", values("alice", sender="m e")),
        fn("notifyBody", values("alice", "hello")),
        fn("notifyBody", values("alice", "hello", "me")),
    )
    assert results[:2] == [None, None]
    assert [r["field"] for r in results[2:7]] == ["to", "to", "to", "text", "from"]
    assert all(r["message"] for r in results[2:7])
    assert results[7] == {"to": "alice", "text": "hello"}
    assert results[8] == {"to": "alice", "text": "hello", "from": "me"}


@needs_node
@pytest.mark.parametrize("scenario", ["relay", "local", "root"])
def test_app_in_a_simulated_page(module_dir: Path, scenario: str) -> None:
    """app.js against a scripted server (see app_scenarios.mjs for what each one checks)."""
    assert NODE is not None
    done = subprocess.run(
        [NODE, str(SCENARIOS), str(module_dir), scenario],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    assert done.stdout.strip() == f"{scenario}: ok"
