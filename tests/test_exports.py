"""The public surface: what trionet re-exports, and that it says it is public.

When this test fails because a name was added or removed on purpose, update
the set below and CHANGELOG.md together.
"""

from __future__ import annotations

import inspect

import trionet
import trionet.testing

PUBLIC = {
    "CloseReason",
    "ConnectError",
    "Connection",
    "ConnectionClosed",
    "ConnectionStatistics",
    "ConnectionStream",
    "Datagram",
    "DatagramError",
    "DatagramStatistics",
    "DatagramTooLarge",
    "Decoder",
    "FrameTooLarge",
    "Frames",
    "Framing",
    "IncompleteMessage",
    "LineTooLong",
    "Lines",
    "MessageTooLarge",
    "PeerCredentials",
    "ProtocolError",
    "Reconnecting",
    "ReconnectingStatistics",
    "Server",
    "ServerOptions",
    "ServerStatistics",
    "StartTLSRefused",
    "TrionetError",
    "UdpPeer",
    "UdpServer",
    "UdpServerOptions",
    "UdpServerStatistics",
    "Worker",
    "connect_tcp",
    "connect_unix",
    "open_tcp_server",
    "open_udp",
    "open_unix_server",
    "open_udp_server",
    "reconnecting",
    "run_workers",
    "serve_tcp",
    "serve_udp",
    "serve_unix",
}


def public_names(module: object) -> set[str]:
    return {
        name
        for name in vars(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }


def test_trionet_exports_exactly_the_public_api() -> None:
    assert public_names(trionet) == PUBLIC


def test_public_objects_live_at_their_public_path() -> None:
    for name in PUBLIC - {"Framing"}:  # Framing is a type alias
        obj = getattr(trionet, name)
        assert obj.__module__ == "trionet", name
        assert obj.__doc__, f"{name} has no docstring"


def test_testing_exports_live_in_trionet_testing() -> None:
    for name in public_names(trionet.testing):
        obj = getattr(trionet.testing, name)
        assert obj.__module__ == "trionet.testing", name
        assert obj.__doc__, f"{name} has no docstring"
