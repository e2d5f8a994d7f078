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


TESTING = {
    "ChunkedStream",
    "ConnectionRecord",
    "DatagramRecord",
    "DelayedStream",
    "Faults",
    "Host",
    "MemoryNetwork",
    "MemoryStream",
    "ResetAfter",
    "StallAfter",
    "Traffic",
    "connection_pair",
    "memory_network",
}


def test_testing_exports_exactly_its_api() -> None:
    assert public_names(trionet.testing) == TESTING


def test_testing_exports_live_in_trionet_testing() -> None:
    for name in public_names(trionet.testing):
        obj = getattr(trionet.testing, name)
        assert obj.__module__ == "trionet.testing", name
        assert obj.__doc__, f"{name} has no docstring"


COMPAT = {
    "tinyproto": {
        "DEFAULT_ACK_TIMEOUT",
        "DEFAULT_MAX_SIZE",
        "LIMIT_REPLY",
        "PROTOCOL_MAX_SIZE",
        "TinyprotoConnection",
        "TinyprotoServer",
        "connect_tinyproto",
        "handle",
        "open_tinyproto_server",
        "serve_tinyproto",
    },
    "socketengine": {
        "ACK",
        "DEFAULT_MAX_LENGTH",
        "DEFAULT_MAX_STORED",
        "IMAGE",
        "EngineConnection",
        "EngineGroup",
        "EngineServer",
        "connect_engine",
        "decode",
        "encode",
        "handle",
        "open_engine_server",
        "serve_engine",
    },
}


def test_compat_modules_export_exactly_their_api() -> None:
    import trionet.compat

    assert {"tinyproto", "socketengine"} <= set(vars(trionet.compat))
    for name, expected in COMPAT.items():
        module = getattr(trionet.compat, name)
        assert set(module.__all__) == expected, name
        for public in expected:
            obj = getattr(module, public)
            if callable(obj):
                assert obj.__module__ == f"trionet.compat.{name}", public
                assert obj.__doc__, f"{public} has no docstring"
