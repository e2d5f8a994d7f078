"""A line protocol with a STARTTLS command, the way SMTP upgrades to TLS.

litesockets' ``startSSL()`` and XAsyncSockets' ``StartSSL()`` turn a plain
connection into a TLS one in place; with trionet that is
``await conn.start_tls(ssl_context)``, on the same Connection object.

The server greets in plaintext and speaks a few SMTP-like commands, one per
CRLF-terminated line:

- ``EHLO name``: a multi-line "250" reply that offers STARTTLS while the
  connection is plain;
- ``STARTTLS``: "220 ready", then both sides do the TLS handshake;
- ``SECRET``: answered only over TLS ("530" before);
- ``NOOP``, ``QUIT``.

The demo runs

1. a trionet client: EHLO, SECRET (refused in plaintext), STARTTLS and
   ``start_tls``, EHLO again (STARTTLS no longer offered), SECRET, QUIT;
2. a client that sends ``STARTTLS`` and ``SECRET`` in one write, without
   waiting for the answer.  Those bytes arrived in plaintext, so the server
   refuses the upgrade (:class:`trionet.StartTLSRefused`) and closes the
   connection (PROTOCOL_ERROR): ``SECRET`` is never answered.  Taking such
   bytes as part of the TLS session is the STARTTLS command injection hole
   (CVE-2011-0411);
3. ``openssl s_client -starttls smtp`` against the same server, when openssl
   is installed.

The certificate comes from ``trustme`` (a test dependency:
``pip install trustme``).  Run it with ``python examples/starttls_lines.py``;
it ends by itself.  With ``--selftest`` it also checks every result and
exits non-zero if one is wrong.
"""

from __future__ import annotations

import shutil
import ssl
import sys
import tempfile
from pathlib import Path

import trio
import trustme

import trionet

LINES = trionet.Lines(delimiter=b"\r\n", max_length=1000)
SECRET = "250 the secret is 42"


def check(condition: bool, what: str) -> None:
    """Fail the self-test (even under ``python -O``) when ``condition`` is false."""
    if not condition:
        raise AssertionError(what)


class MailLikeServer:
    """The server's handler, and what it saw."""

    def __init__(self, server_context: ssl.SSLContext) -> None:
        self.server_context = server_context
        self.refused: list[trionet.StartTLSRefused] = []
        self.secrets_told = 0

    async def handle(self, conn: trionet.Connection) -> None:
        await conn.send("220 trionet example ready")
        tls = False
        async for line in conn:
            command = line.split(b" ", 1)[0].upper()
            if command in (b"EHLO", b"HELO"):
                offer = [] if tls else ["250-STARTTLS"]
                for reply in ["250-hello", *offer, "250 OK"]:
                    await conn.send(reply)
            elif command == b"STARTTLS" and not tls:
                await conn.send("220 ready to start TLS")
                try:
                    await conn.start_tls(self.server_context)
                except trionet.StartTLSRefused as exc:
                    # The connection is closed (PROTOCOL_ERROR) already.
                    self.refused.append(exc)
                    print(f"  server: {exc}")
                    return
                tls = True
            elif command == b"SECRET":
                if tls:
                    self.secrets_told += 1
                    await conn.send(SECRET)
                else:
                    await conn.send("530 must issue STARTTLS first")
            elif command == b"NOOP":
                await conn.send("250 OK")
            elif command == b"QUIT":
                await conn.send("221 bye")
                return
            else:
                await conn.send("500 unknown command")


def make_contexts() -> tuple[trustme.CA, ssl.SSLContext, ssl.SSLContext]:
    """A test CA, a server context for "localhost", a client that trusts it."""
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    return ca, server_context, client_context


async def read_reply(conn: trionet.Connection) -> list[bytes]:
    """One (possibly multi-line) reply: lines up to one with a space after
    the code."""
    lines = [await conn.receive()]
    while lines[-1][3:4] == b"-":
        lines.append(await conn.receive())
    return lines


async def polite_client(port: int, client_context: ssl.SSLContext) -> list[bytes]:
    """The dialogue of a client that does it right; returns every reply line."""
    seen: list[bytes] = []
    async with trionet.connect_tcp(
        "127.0.0.1", port, framing=LINES, server_hostname="localhost"
    ) as conn:

        async def say(command: str) -> None:
            await conn.send(command)
            reply = await read_reply(conn)
            print(f"  client: {command!r} -> {[r.decode() for r in reply]}")
            seen.extend(reply)

        seen.extend(await read_reply(conn))  # the greeting
        await say("EHLO example.net")
        await say("SECRET")
        await say("STARTTLS")
        await conn.start_tls(client_context)  # the same connection, now TLS
        print("  client: TLS is up")
        await say("EHLO example.net")
        await say("SECRET")
        await say("QUIT")
    return seen


async def hasty_client(port: int) -> bytes:
    """Sends STARTTLS and SECRET at once; returns everything it then reads."""
    received = b""
    async with trionet.connect_tcp("127.0.0.1", port) as conn:
        print("  hasty client: b'STARTTLS\\r\\nSECRET\\r\\n' in one write")
        await conn.send_all(b"STARTTLS\r\nSECRET\r\n")
        try:
            while chunk := await conn.receive_some():
                received += chunk
        except trionet.ConnectionClosed:
            pass  # (a reset: the server closed with our bytes unread)
    print(f"  hasty client read {received!r}, then the end of the stream")
    return received


async def openssl_session(port: int, ca: trustme.CA) -> str | None:
    """Run ``openssl s_client -starttls smtp`` against the server: after the
    upgrade it sends EHLO, SECRET and QUIT.  Returns what it printed, or None
    when openssl is not installed."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        ca_file = Path(tmp) / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        with trio.fail_after(30):  # (run_process kills it if this runs out)
            result = await trio.run_process(
                [
                    openssl,
                    "s_client",
                    "-starttls",
                    "smtp",
                    "-connect",
                    f"127.0.0.1:{port}",
                    "-servername",
                    "localhost",
                    "-verify_hostname",
                    "localhost",
                    "-CAfile",
                    str(ca_file),
                    "-verify_return_error",
                    "-crlf",
                    "-quiet",
                ],
                stdin=b"EHLO openssl.example\nSECRET\nQUIT\n",
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
    output = result.stdout.decode(errors="replace")
    print(f"  openssl s_client exited with {result.returncode}; it printed:")
    for line in output.splitlines():
        print(f"    {line}")
    return output


async def main(selftest: bool) -> None:
    ca, server_context, client_context = make_contexts()
    mail = MailLikeServer(server_context)
    async with trionet.open_tcp_server(
        mail.handle, host="127.0.0.1", framing=LINES
    ) as server:
        print(f"server on 127.0.0.1:{server.port}")
        print("1. a client that waits for each answer:")
        seen = await polite_client(server.port, client_context)
        print("2. a client that does not wait after STARTTLS:")
        hasty = await hasty_client(server.port)
        print("3. openssl s_client -starttls smtp:")
        openssl_output = await openssl_session(server.port, ca)
        if openssl_output is None:
            print("  (openssl is not installed; skipped)")
    stats = server.statistics()
    print(f"server stats: {stats}")

    if selftest:
        check(b"250-STARTTLS" in seen[:5], f"STARTTLS offered in plaintext: {seen}")
        check(b"530 must issue STARTTLS first" in seen, "SECRET refused in plaintext")
        check(seen.count(b"250-STARTTLS") == 1, "not offered again over TLS")
        check(SECRET.encode() in seen, "SECRET answered over TLS")
        check(seen[-1] == b"221 bye", f"last reply {seen[-1]!r}")
        check(SECRET.encode() not in hasty, f"the hasty client got {hasty!r}")
        check(len(mail.refused) == 1, f"refusals {mail.refused}")
        check(mail.refused[0].buffered == len(b"SECRET\r\n"), "the refused bytes")
        told = 1
        if openssl_output is not None:
            check(SECRET in openssl_output, "openssl got the secret over TLS")
            check("221 bye" in openssl_output, "openssl said QUIT")
            told = 2
        check(mail.secrets_told == told, f"secrets told {mail.secrets_told}")
        reasons = stats.closed
        check(
            reasons.get(trionet.CloseReason.PROTOCOL_ERROR) == 1,
            f"close reasons {reasons}",
        )
        print("selftest passed")


if __name__ == "__main__":
    trio.run(main, "--selftest" in sys.argv[1:])
