"""trionet's pytest plugin, run on small test projects with pytester (in-process)."""

from __future__ import annotations

import re
import textwrap
from importlib.metadata import entry_points
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).parent.parent / "examples" / "test_with_trionet.py"

INI = """
[pytest]
trio_mode = true
filterwarnings = error
"""


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    """A test project in trio mode, with no conftest.py."""
    pytester.makeini(INI)
    return pytester


def run(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    # -p no:randomly: the projects below rely on tests running in file order.
    return pytester.runpytest_inprocess(
        "-p", "no:randomly", "-p", "no:cacheprovider", *args
    )


def test_registered_as_a_pytest11_entry_point() -> None:
    plugins = {ep.name: ep.value for ep in entry_points(group="pytest11")}
    assert plugins.get("trionet") == "trionet._pytest_plugin"


def test_fixtures_are_listed(project: pytest.Pytester) -> None:
    project.makepyfile("def test_nothing(): pass")
    result = run(project, "--fixtures")
    assert result.ret == 0
    result.stdout.re_match_lines(
        [
            r".*fixtures defined from trionet._pytest_plugin.*",
            r"echo_server .*",
        ],
        consecutive=False,
    )
    for name in ("tcp_server", "tcp_client", "udp_server", "echo_server"):
        assert re.search(rf"^{name} ", result.stdout.str(), re.MULTILINE), name


def test_a_project_using_every_fixture_passes(project: pytest.Pytester) -> None:
    project.makepyfile(
        textwrap.dedent(
            """
            import pytest
            import trio
            import trionet

            async def shout(conn):
                async for line in conn:
                    await conn.send(line.upper())

            async def test_tcp_server_and_client(tcp_server, tcp_client):
                server = await tcp_server(shout, framing=trionet.Lines())
                assert isinstance(server, trionet.Server)
                assert server.addresses[0][0] == "127.0.0.1"
                assert server.port != 0
                conn = await tcp_client(server)
                assert conn.framing == trionet.Lines()
                await conn.send("hi")
                assert await conn.receive() == b"HI"

            async def test_client_targets(tcp_server, tcp_client):
                server = await tcp_server(shout, framing=trionet.Lines())
                raw = await tcp_client(server, framing=None)
                by_tuple = await tcp_client(("127.0.0.1", server.port))
                by_port = await tcp_client(server.port, framing=trionet.Lines())
                assert raw.framing is None and by_tuple.framing is None
                for conn in (raw, by_tuple):
                    await conn.send_all(b"raw\\n")
                    assert await conn.receive_line() == b"RAW"
                await by_port.send("port")
                assert await by_port.receive() == b"PORT"
                with pytest.raises(TypeError, match="tcp_client needs"):
                    await tcp_client("127.0.0.1")

            async def test_server_options(tcp_server, tcp_client):
                seen = []
                server = await tcp_server(
                    shout, framing=trionet.Lines(), on_connect=seen.append
                )
                conn = await tcp_client(server)
                await conn.send("x")
                assert await conn.receive() == b"X"
                assert len(seen) == 1
                assert server.statistics().accepted == 1

            async def test_several_servers(tcp_server, tcp_client):
                one = await tcp_server(shout, framing=trionet.Lines())
                two = await tcp_server(shout, framing=trionet.Lines())
                assert one.port != two.port
                for server in (one, two):
                    conn = await tcp_client(server)
                    await conn.send("n")
                    assert await conn.receive() == b"N"

            async def test_echo_server(echo_server, tcp_client):
                assert isinstance(echo_server, trionet.Server)
                conn = await tcp_client(echo_server)
                for line in ("one", "two"):
                    await conn.send(line)
                    assert await conn.receive() == line.encode()

            async def test_udp_server(udp_server):
                async def echo(peer):
                    async for data in peer:
                        await peer.send(data)

                server = await udp_server(echo, max_size=100)
                assert isinstance(server, trionet.UdpServer)
                assert server.max_size == 100
                async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                    await ep.send(b"ping")
                    with trio.fail_after(5):
                        assert await ep.receive() == b"ping"

            async def test_a_closed_server_is_fine(tcp_server, tcp_client, udp_server):
                # The fixtures' teardown closes them again, harmlessly.
                server = await tcp_server(shout, framing=trionet.Lines())
                conn = await tcp_client(server)
                await conn.send("a")
                assert await conn.receive() == b"A"
                await conn.aclose()
                await server.aclose()
                udp = await udp_server(shout)
                await udp.aclose()
            """
        )
    )
    result = run(project)
    result.assert_outcomes(passed=7)


def test_marked_trio_tests_work_without_trio_mode(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.trio
        async def test_marked(echo_server, tcp_client):
            conn = await tcp_client(echo_server)
            await conn.send("marked")
            assert await conn.receive() == b"marked"
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_clients_are_closed_before_servers(project: pytest.Pytester) -> None:
    # With grace_period=0 a server shut down first would cancel its handler;
    # closing the client first lets the handler see end of stream.
    project.makepyfile(
        """
        import pytest
        import trio
        import trio.testing
        import trionet

        EVENTS = []

        async def handler(conn):
            try:
                async for line in conn:
                    await conn.send(line)
                EVENTS.append("end of stream")
            except trio.Cancelled:
                EVENTS.append("cancelled")
                raise

        @pytest.fixture
        async def slow_to_finish(tcp_client):
            # Tears down before tcp_client and holds it back, so a server
            # that did not wait for tcp_client would shut down first.
            yield tcp_client
            await trio.testing.wait_all_tasks_blocked()

        async def test_one(tcp_server, slow_to_finish):
            server = await tcp_server(handler, framing=trionet.Lines(), grace_period=0)
            conn = await slow_to_finish(server)
            await conn.send("x")
            assert await conn.receive() == b"x"

        def test_two():
            assert EVENTS == ["end of stream"]
        """
    )
    run(project).assert_outcomes(passed=2)


def test_a_raising_tcp_handler_fails_the_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import trionet

        async def explode(conn):
            line = await conn.receive()
            await conn.send(line)
            raise ValueError("handler exploded on " + line.decode())

        async def test_explodes(tcp_server, tcp_client):
            server = await tcp_server(explode, framing=trionet.Lines())
            conn = await tcp_client(server)
            await conn.send("purpose")
            assert await conn.receive() == b"purpose"

        async def test_quiet(tcp_server):
            await tcp_server(explode)
        """
    )
    result = run(project)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Failed: trionet tcp_server: the handler explode() of the TCP server "
            "on 127.0.0.1:* raised 1 exception*",
            "*ValueError: handler exploded on purpose",
            "FAILED *::test_explodes*",
        ]
    )
    assert "test_quiet" not in "".join(
        line for line in result.stdout.lines if line.startswith("FAILED")
    )


def test_a_raising_udp_handler_fails_the_test(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import trio
        import trionet

        async def explode(peer):
            data = await peer.receive()
            await peer.send(data)
            raise KeyError("udp handler exploded")

        async def test_explodes(udp_server):
            server = await udp_server(explode)
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"go")
                with trio.fail_after(5):
                    assert await ep.receive() == b"go"
        """
    )
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Failed: trionet udp_server: the handler explode() of the UDP server "
            "on 127.0.0.1:* raised 1 exception*",
            "*KeyError: 'udp handler exploded'",
        ]
    )


def test_a_udp_handler_ending_with_its_own_close_is_not_an_error(
    project: pytest.Pytester,
) -> None:
    # Letting the peer's own ConnectionClosed escape (here: at shutdown) is
    # a normal way for a UDP handler to end.
    project.makepyfile(
        """
        import trio
        import trionet

        STARTED = []

        async def wait_forever(peer):
            STARTED[0].set()
            while True:
                await peer.receive()

        async def test_shutdown(udp_server):
            STARTED.append(trio.Event())
            server = await udp_server(wait_forever)
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"start a handler")
                with trio.fail_after(5):
                    await STARTED[0].wait()
        """
    )
    run(project).assert_outcomes(passed=1)


def test_a_udp_handler_ending_with_its_own_close_in_a_group_is_not_an_error(
    project: pytest.Pytester,
) -> None:
    # A handler with a nursery of its own gets its peer's end (here: the
    # shutdown at the end of the test) as ExceptionGroup([ConnectionClosed]);
    # the plugin reads the server's handler_exceptions, which leave it out.
    project.makepyfile(
        """
        import trio
        import trionet

        async def reader_and_writer(peer):
            async def read():
                async for data in peer:
                    await peer.send(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                nursery.start_soon(read)

        async def test_group(udp_server):
            server = await udp_server(reader_and_writer)
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"start a handler")
                with trio.fail_after(5):
                    assert await ep.receive() == b"start a handler"

        async def buggy(peer):
            await peer.send(await peer.receive())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(peer.receive)
                raise LookupError("a real bug")

        async def test_group_with_a_bug(udp_server):
            server = await udp_server(buggy)
            async with trionet.open_udp(remote=("127.0.0.1", server.port)) as ep:
                await ep.send(b"go")
                with trio.fail_after(5):
                    assert await ep.receive() == b"go"
                await trio.testing.wait_all_tasks_blocked()
        """
    )
    result = run(project)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*Failed: trionet udp_server: the handler buggy() of the UDP server "
            "on 127.0.0.1:* raised 1 exception*",
            "*LookupError: a real bug",
            "FAILED *::test_group_with_a_bug*",
        ]
    )


def test_many_handler_errors_are_summarised(project: pytest.Pytester) -> None:
    project.makepyfile(
        """
        import trionet

        async def explode(conn):
            await conn.send("bye")
            raise RuntimeError(f"exploded {id(conn)}")

        async def test_explodes_five_times(tcp_server, tcp_client):
            server = await tcp_server(explode, framing=trionet.Lines())
            for _ in range(5):
                conn = await tcp_client(server)
                assert await conn.receive() == b"bye"
        """
    )
    result = run(project)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*the handler explode() of the TCP server * raised 5 exceptions*",
            "*... and 2 more: RuntimeError(*), RuntimeError(*)",
        ]
    )
    # Three full tracebacks in the failure message (the log shows all five).
    assert result.stdout.str().count("| RuntimeError: exploded") == 3


def test_user_fixtures_of_the_same_name_win(project: pytest.Pytester) -> None:
    project.makeconftest(
        """
        import pytest

        @pytest.fixture
        def tcp_server():
            return "the project's tcp_server"
        """
    )
    project.makepyfile(
        """
        import pytest

        @pytest.fixture
        async def echo_server():
            return "the module's echo_server"

        async def test_overridden(tcp_server, echo_server):
            assert tcp_server == "the project's tcp_server"
            assert echo_server == "the module's echo_server"

        async def test_not_overridden(udp_server, tcp_client):
            assert callable(udp_server) and callable(tcp_client)
        """
    )
    run(project).assert_outcomes(passed=2)


def test_the_documented_example_passes(project: pytest.Pytester) -> None:
    source = EXAMPLE.read_text(encoding="utf-8")
    tests = len(re.findall(r"^async def test_", source, re.MULTILINE))
    assert tests >= 5
    project.makepyfile(test_with_trionet=source)
    run(project).assert_outcomes(passed=tests)
