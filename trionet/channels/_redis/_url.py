"""Redis URLs: checked when a backplane is made, shown without the password.

Sans-IO.  ``redis://[[user]:password@]host[:port][/db]`` (TCP),
``rediss://...`` (TLS) and ``unix://[[user]:password@]/path[?db=N]`` are
accepted; anything else is refused with a :class:`ValueError` that says what
a Redis URL looks like, with any password replaced by ``***``.
"""

from __future__ import annotations

import re
from typing import final
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import attrs

__all__ = ["DEFAULT_PORT", "RedisAddress", "parse_redis_url", "redact"]

DEFAULT_PORT = 6379
_SCHEMES = ("redis", "rediss", "unix")
_EXPECTED = (
    "a Redis URL is redis://[[user]:password@]host[:port][/db], rediss://... "
    "for TLS or unix://[[user]:password@]/path[?db=N]"
)
# user:password@ in whatever follows "//", for URLs urlsplit cannot read.
_PASSWORD = re.compile(r"(//[^/@]*?:)[^/@]*@")


@final
@attrs.frozen(kw_only=True)
class RedisAddress:
    """Where a Redis server is and how to log in, from a checked URL."""

    #: "redis", "rediss" (TLS) or "unix".
    scheme: str
    #: Host name or address for redis:// and rediss://, else None.
    host: str | None
    #: TCP port (6379 unless the URL says otherwise).
    port: int
    #: Socket path for unix://, else None.
    path: str | None
    #: ACL user name, or None for the default user.
    username: str | None
    #: Password, or None to send no AUTH.
    password: str | None = attrs.field(repr=False)
    #: Database number for SELECT (0: no SELECT needed).
    db: int
    #: The URL with its password replaced by ``***``.
    display: str

    @property
    def tls(self) -> bool:
        """Whether the connection is wrapped in TLS."""
        return self.scheme == "rediss"


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return _PASSWORD.sub(r"\1***@", url)
    if password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def parse_redis_url(url: object) -> RedisAddress:
    """Check ``url`` and take it apart.

    Raises:
        TypeError: ``url`` is not a str.
        ValueError: ``url`` is not a redis://, rediss:// or unix:// URL, or a
            part of it (port, database number, query) is invalid.
    """
    if not isinstance(url, str):
        raise TypeError(f"the Redis URL must be a str, not {type(url).__name__}")
    shown = redact(url)

    def invalid(why: str) -> ValueError:
        return ValueError(f"{shown!r} is not a valid Redis URL: {why}; {_EXPECTED}")

    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise invalid(str(exc).lower()) from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise invalid(f"scheme {parts.scheme!r}" if parts.scheme else "no scheme")
    if not url.lower().startswith(f"{scheme}://"):
        raise invalid(f"it must start with {scheme}://")
    if parts.fragment:
        raise invalid("it has a #fragment")
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    unknown = sorted(set(query) - {"db"})
    if unknown:
        raise invalid(f"unknown query parameter {unknown[0]!r}")
    username = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password is not None else None
    if scheme == "unix":
        if not parts.path:
            raise invalid("no socket path")
        if port is not None or parts.hostname:
            raise invalid("a unix:// URL has a path, not a host")
        host, path, db_text = None, unquote(parts.path), query.get("db", "0")
    else:
        if not parts.hostname:
            raise invalid("no host")
        if "db" in query:
            raise invalid("give the database as the path, redis://host/N")
        host, path, db_text = parts.hostname, None, parts.path.lstrip("/") or "0"
    if not (db_text.isascii() and db_text.isdigit()):
        raise invalid(f"database {db_text!r} is not a number")
    return RedisAddress(
        scheme=scheme,
        host=host,
        port=DEFAULT_PORT if port is None else port,
        path=path,
        username=username,
        password=password,
        db=int(db_text),
        display=shown,
    )
