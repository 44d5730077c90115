"""A browser's session at the relay, made over HTTP: the sign-in form and its cookie.

A session id is a secret: these helpers hand it over in memory and never print it.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlencode

from .clients import Address, HttpResponse, http_request


def form_body(**fields: str) -> bytes:
    """An ``application/x-www-form-urlencoded`` body."""
    return urlencode(fields).encode()


def cookie_from(response: HttpResponse) -> tuple[str, str]:
    """A ``("Cookie", "name=value")`` header from a response's Set-Cookie."""
    set_cookie = response.header("set-cookie")
    assert set_cookie is not None, "no Set-Cookie in the response"
    return ("Cookie", set_cookie.split(";", 1)[0].strip())


async def post_key(
    address: Address, key: str, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    """Post ``key`` to the relay's ``/auth`` form; the relay's answer, whatever it is."""
    return await http_request(
        address,
        "POST",
        "/auth",
        body=form_body(api_key=key),
        headers=[("Content-Type", "application/x-www-form-urlencoded"), *headers],
    )


async def sign_in(
    address: Address, key: str, headers: Sequence[tuple[str, str]] = ()
) -> tuple[HttpResponse, tuple[str, str]]:
    """Post ``key`` to the relay's ``/auth`` form; ``(response, ("Cookie", ...))``.

    Fails unless the relay answered 303 with a session cookie.
    """
    response = await post_key(address, key, headers)
    assert response.status == 303, f"sign-in answered {response.status}"
    assert response.header("set-cookie") is not None, "sign-in set no cookie"
    return response, cookie_from(response)


def session_id_of(cookie: tuple[str, str]) -> str:
    """The session id in a ``("Cookie", "name=value")`` header."""
    return cookie[1].split("=", 1)[1]


def cookie_attributes(set_cookie: str) -> dict[str, str]:
    """The attributes of a Set-Cookie value, names lower-case (``{"httponly": "", ...}``)."""
    attributes: dict[str, str] = {}
    for part in set_cookie.split(";")[1:]:
        name, _, value = part.strip().partition("=")
        attributes[name.lower()] = value
    return attributes
