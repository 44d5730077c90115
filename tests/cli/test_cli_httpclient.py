"""The blocking JSON client used by the command line, against real loopback servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from repowire._httpclient import MAX_RESPONSE_BYTES, HttpError, request_json, safe_url
from tests.support.fake_http import FakeHttpServer, Reply, SelfSigned

from .cli_support import NETWORK_TEST_TIMEOUT


async def call(
    url: str,
    *,
    body: dict[str, Any] | None = None,
    bearer: str | None = None,
    ca_file: Path | None = None,
) -> tuple[int, dict[str, Any]]:
    """``request_json`` in a worker thread (POST when there is a body, else GET)."""

    def blocking() -> tuple[int, dict[str, Any]]:
        method = "GET" if body is None else "POST"
        return request_json(method, url, body=body, bearer=bearer, ca_file=ca_file, timeout=5)

    return await trio.to_thread.run_sync(blocking, abandon_on_cancel=True)


async def test_json_round_trip_with_bearer_in_the_header_only(
    http_server: FakeHttpServer, key: str
) -> None:
    http_server.reply_json("POST", "/api/thing", 201, {"ok": True, "n": 3})
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        status, answer = await call(http_server.base + "/api/thing", body={"a": 1}, bearer=key)
    assert (status, answer) == (201, {"ok": True, "n": 3})
    [request] = http_server.requests
    assert request.method == "POST"
    assert request.target == "/api/thing"
    assert request.headers["authorization"] == f"Bearer {key}"
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {"a": 1}
    assert key not in request.target


async def test_error_status_with_json_is_returned(http_server: FakeHttpServer) -> None:
    http_server.reply_json("GET", "/x", 401, {"error": "invalid_key", "detail": "Unknown key."})
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        status, answer = await call(http_server.base + "/x")
    assert status == 401
    assert answer["error"] == "invalid_key"


async def test_empty_answer_reads_as_empty_object(http_server: FakeHttpServer) -> None:
    http_server.reply_raw("GET", "/gone", Reply(status=204, body=b""))
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        assert await call(http_server.base + "/gone") == (204, {})


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (Reply(status=200, body=b"<html>hi</html>", content_type="text/html"), "not JSON"),
        (Reply(status=502, body=b"Bad Gateway", content_type="text/plain"), "502"),
        (Reply(status=200, body=b"[1, 2]"), "not an object"),
        (Reply(status=200, body=b"\xff\xfe"), "not JSON"),
        (Reply(status=200, body=b" " * (MAX_RESPONSE_BYTES + 1)), "more than"),
    ],
)
async def test_bad_answers_raise_one_line(
    http_server: FakeHttpServer, reply: Reply, fragment: str, key: str
) -> None:
    http_server.reply_raw("GET", "/x", reply)
    with trio.fail_after(NETWORK_TEST_TIMEOUT), pytest.raises(HttpError) as caught:
        await call(http_server.base + "/x", bearer=key)
    message = str(caught.value)
    assert fragment in message
    assert "\n" not in message
    assert key not in message
    assert caught.value.status == reply.status
    assert caught.value.unreachable is False


async def test_redirects_are_not_followed(http_server: FakeHttpServer, key: str) -> None:
    http_server.reply_raw(
        "POST",
        "/old",
        Reply(status=307, body=b"{}", extra_headers=(("Location", http_server.base + "/new"),)),
    )
    with trio.fail_after(NETWORK_TEST_TIMEOUT), pytest.raises(HttpError, match="redirect"):
        await call(http_server.base + "/old", body={}, bearer=key)
    # Only the first request happened: the key was not replayed to the redirect's target.
    assert [r.target for r in http_server.requests] == ["/old"]


async def test_unreachable_host_is_flagged(closed_port: int, key: str) -> None:
    with trio.fail_after(NETWORK_TEST_TIMEOUT), pytest.raises(HttpError) as caught:
        await call(f"http://127.0.0.1:{closed_port}/health", bearer=key)
    assert caught.value.unreachable is True
    assert "connection refused" in str(caught.value)
    assert key not in str(caught.value)


async def test_tls_to_a_plain_http_server_fails_cleanly(http_server: FakeHttpServer) -> None:
    url = f"https://127.0.0.1:{http_server.port}/x"
    with trio.fail_after(NETWORK_TEST_TIMEOUT), pytest.raises(HttpError, match="TLS") as caught:
        await call(url)
    assert "\n" not in str(caught.value)


async def test_self_signed_server_needs_its_ca_file(
    tls_server: FakeHttpServer, self_signed: SelfSigned
) -> None:
    tls_server.reply_json("GET", "/x", 200, {"ok": True})
    with trio.fail_after(NETWORK_TEST_TIMEOUT):
        with pytest.raises(HttpError, match="not trusted") as caught:
            await call(tls_server.base + "/x")
        assert caught.value.unreachable is False
        assert await call(tls_server.base + "/x", ca_file=self_signed.cert) == (200, {"ok": True})


def test_unreadable_ca_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(HttpError, match="cannot use CA file"):
        request_json("GET", "https://127.0.0.1:1/x", ca_file=tmp_path / "missing.pem", timeout=1)


@pytest.mark.parametrize("url", ["ftp://x/y", "http:///nohost", "not a url"])
def test_non_http_urls_are_refused(url: str) -> None:
    with pytest.raises(HttpError, match="URL"):
        request_json("GET", url, timeout=1)


def test_safe_url_drops_credentials_and_query() -> None:
    assert safe_url("https://user:pw@h.example:8443/p?key=v#f") == "https://h.example:8443/p"
    assert safe_url("http://[::1]:80/x") == "http://[::1]:80/x"
