"""The serve-file console: N pauses server N, rN resumes it, eN ends a paused one; a
command that does not apply says why instead of pretending."""

from __future__ import annotations

from servers.fileserver import VirtualServer, console_command


def test_console_says_what_it_did_and_what_it_cannot(tmp_path):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    servers = [VirtualServer(n, 0, f, 10, 0) for n in (1, 2, 3)]
    try:
        assert console_command(servers, "r3") == "server 3 is not paused: nothing to resume"
        assert servers[2].state == "alive"
        assert console_command(servers, "3") == "server 3 paused"
        assert console_command(servers, "3") == "server 3 is already paused (r3 resumes it)"
        assert console_command(servers, "r3") == "server 3 resumed"
        assert console_command(servers, "e2").startswith("pause server 2 first")
        assert console_command(servers, "2") == "server 2 paused"
        assert console_command(servers, "e2") == "server 2 ended"
        assert console_command(servers, "r2") == "server 2 has ended"
        assert console_command(servers, "r9").startswith("unknown command 'r9'")
    finally:
        for s in servers:
            s.end()
