"""fstab options to a mirrorfs-mount command line: ours mapped, mount(8)'s dropped, the
rest refused by name."""

from __future__ import annotations

import pytest

from mirrorfuse.tools import fstab
from mirrorfuse.wire.errors import UsageError

SERVERS = "a:7000,b:7000,c:7000,d:7000"


def argv(*options: str, sloppy: bool = False) -> list[str]:
    command, _ = fstab.mount_argv(SERVERS, "/mnt/mfs", list(options), sloppy)
    return command


def test_ours_are_mapped_and_mounts_own_dropped():
    got = argv(
        "rw,nosuid,nodev,_netdev,noauto,nofail,x-systemd.automount,"
        "x-systemd.requires=mirrorfs-server@0.service,comment=systemd.x,defaults",
        "key_file=/etc/mirrorfs/v.key,tls,timeout=2.5,log=/var/log/mfs.log,force",
    )
    assert got == [
        "--servers",
        SERVERS,
        "--key-file",
        "/etc/mirrorfs/v.key",
        "--tls",
        "--timeout",
        "2.5",
        "--log",
        "/var/log/mfs.log",
        "--force",
        "/mnt/mfs",
    ]


def test_key_file_with_a_dash_and_no_options():
    assert argv("key-file=/k") == ["--servers", SERVERS, "--key-file", "/k", "/mnt/mfs"]
    assert argv() == ["--servers", SERVERS, "/mnt/mfs"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("colour=blue", "unknown option 'colour=blue' (mirrorfs takes key_file=FILE, tls,"),
        ("ro", "read-only mounts are not supported"),
        ("noexec", "noexec is not supported"),
        ("sync", "sync is not supported"),
        ("key_file=", "option key_file needs a value (key_file=...)"),
        ("timeout", "option timeout needs a value"),
        ("timeout=soon", "option timeout: 'soon' is not a number of seconds"),
        ("timeout=-1", "option timeout: '-1' is not a positive number of seconds"),
        ("tls=yes", "option tls takes no value"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(UsageError) as exc:
        argv(options)
    assert str(exc.value).startswith(message)


def test_sloppy_ignores_unknown_but_not_refused():
    command, unknown = fstab.mount_argv(SERVERS, "/m", ["colour=blue,tls"], sloppy=True)
    assert command == ["--servers", SERVERS, "--tls", "/m"] and unknown == ["colour=blue"]
    with pytest.raises(UsageError, match="read-only"):
        fstab.mount_argv(SERVERS, "/m", ["ro"], sloppy=True)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("mirrorfs", "server address 'mirrorfs' is not host:port (the source is the servers"),
        ("a:7000,b:7000,c:7000", "3 servers is an odd number"),
    ],
)
def test_bad_source(source, message):
    with pytest.raises(UsageError) as exc:
        fstab.mount_argv(source, "/m", [])
    assert str(exc.value).startswith(message)


def test_main_mounts_what_it_mapped_or_nothing(capsys):
    calls: list[list[str]] = []

    def mount(command: list[str]) -> int:
        calls.append(command)
        return 0

    assert fstab.main([SERVERS, "/m", "-o", "rw,_netdev", "-o", "tls"], mount) == 0
    assert calls == [["--servers", SERVERS, "--tls", "/m"]]
    assert fstab.main([SERVERS, "/m", "-f", "-o", "tls"], mount) == 0  # -f: checked only
    assert fstab.main([SERVERS, "/m", "-sv", "-o", "odd"], mount) == 0
    assert "ignoring unknown option 'odd' (-s)" in capsys.readouterr().err
    assert len(calls) == 2
    assert fstab.main([SERVERS, "/m", "-o", "ro"], mount) == 1
    assert fstab.main([SERVERS, "/m", "-N", "/proc/1/ns/mnt"], mount) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "mount.fuse.mirrorfs: error: read-only mounts are not supported (a mount takes the "
        "volume's write lease)",
        "mount.fuse.mirrorfs: error: mounting in another namespace (-N) is not supported",
    ]
    assert len(calls) == 2
