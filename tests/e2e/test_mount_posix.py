"""POSIX conformance on a real mount: the calls of file system test suites, errors included."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import Mount

NOBODY = 65534


def err(func, *args) -> int:
    """The errno a call fails with (the test fails if it succeeds)."""
    with pytest.raises(OSError) as info:
        func(*args)
    return info.value.errno


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python code as an unprivileged user; it prints its result."""

    def drop() -> None:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)

    # the system's Python: the project's may live under a directory nobody cannot enter
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    return subprocess.run(
        [python, "-c", code], capture_output=True, text=True, preexec_fn=drop, timeout=60, cwd="/"
    )


def errno_as_nobody(op: str) -> str:
    res = as_nobody(
        f"import os, errno\ntry:\n    {op}\n    print('OK')\n"
        "except OSError as e:\n    print(errno.errorcode[e.errno])"
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_open_and_create(mfs: Mount):
    m = mfs.path
    assert err(os.open, m / "missing", os.O_RDONLY) == errno.ENOENT
    fd = os.open(m / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"abc")
    os.close(fd)
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o640
    assert err(os.open, m / "f", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    fd = os.open(m / "f", os.O_CREAT | os.O_WRONLY)  # no O_EXCL: opens the existing file
    os.close(fd)
    assert (m / "f").read_bytes() == b"abc"
    fd = os.open(m / "f", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert os.stat(m / "f").st_size == 0
    assert err(os.open, m / "f" / "x", os.O_CREAT | os.O_WRONLY) == errno.ENOTDIR
    os.mkdir(m / "d")
    assert err(os.open, m / "d", os.O_WRONLY) == errno.EISDIR
    assert err(os.open, m / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    fd = os.open(m / ("n" * 255), os.O_CREAT | os.O_WRONLY)
    os.close(fd)


def test_unlink_and_rmdir(mfs: Mount):
    m = mfs.path
    os.makedirs(m / "d" / "sub")
    (m / "f").write_text("x")
    assert err(os.unlink, m / "missing") == errno.ENOENT
    assert err(os.unlink, m / "d") == errno.EISDIR
    assert err(os.rmdir, m / "f") == errno.ENOTDIR
    assert err(os.rmdir, m / "d") == errno.ENOTEMPTY
    assert err(os.rmdir, m / "missing") == errno.ENOENT
    assert err(os.unlink, m / "f" / "x") == errno.ENOTDIR
    os.rmdir(m / "d" / "sub")
    os.rmdir(m / "d")
    os.unlink(m / "f")
    assert os.listdir(m) == []


def test_rename(mfs: Mount):
    m = mfs.path
    os.makedirs(m / "a" / "b")
    os.mkdir(m / "full")
    (m / "full" / "x").write_text("x")
    (m / "f").write_text("f")
    (m / "g").write_text("g")
    assert err(os.rename, m / "missing", m / "z") == errno.ENOENT
    assert err(os.rename, m / "a", m / "a" / "b" / "c") == errno.EINVAL  # into itself
    assert err(os.rename, m / "a", m / "full") == errno.ENOTEMPTY
    assert err(os.rename, m / "a", m / "f") == errno.ENOTDIR
    assert err(os.rename, m / "f", m / "a") == errno.EISDIR
    os.link(m / "f", m / "f2")
    os.rename(m / "f", m / "f2")  # two names of one file: nothing happens
    assert (m / "f").exists() and (m / "f2").exists()
    os.rename(m / "f", m / "g")
    assert (m / "g").read_text() == "f" and not (m / "f").exists()
    os.rename(m / "a" / "b", m / "b")  # across directories (never EXDEV)
    assert os.stat(m / "a").st_nlink == 2 and os.stat(m).st_nlink == 5
    os.rename(m / "b", m / "full" / "b")
    assert sorted(os.listdir(m / "full")) == ["b", "x"]


def test_rename_noreplace(mfs: Mount):
    m = mfs.path
    (m / "a").write_text("a")
    (m / "b").write_text("b")
    res = subprocess.run(["mv", "--no-clobber", str(m / "a"), str(m / "b")], capture_output=True)
    assert (m / "b").read_text() == "b" and (m / "a").exists(), res.stderr


def test_link_and_symlink(mfs: Mount):
    m = mfs.path
    os.mkdir(m / "d")
    (m / "f").write_text("data")
    assert err(os.link, m / "d", m / "d2") == errno.EPERM
    assert err(os.link, m / "missing", m / "x") == errno.ENOENT
    assert err(os.link, m / "f", m / "d") == errno.EEXIST
    os.link(m / "f", m / "d" / "f")
    assert (
        os.stat(m / "f").st_nlink == 2 and os.stat(m / "f").st_ino == os.stat(m / "d" / "f").st_ino
    )
    os.symlink("/nowhere/at/all", m / "dangling")
    assert os.readlink(m / "dangling") == "/nowhere/at/all"
    assert os.lstat(m / "dangling").st_size == len("/nowhere/at/all")
    assert err(os.stat, m / "dangling") == errno.ENOENT
    assert err(os.symlink, "x", m / "f") == errno.EEXIST
    assert err(os.readlink, m / "f") == errno.EINVAL


def test_mkdir_and_setgid_inheritance(mfs: Mount):
    m = mfs.path
    os.mkdir(m / "d", 0o700)
    assert stat.S_IMODE(os.stat(m / "d").st_mode) == 0o700
    assert err(os.mkdir, m / "d") == errno.EEXIST
    assert err(os.mkdir, m / "missing" / "x") == errno.ENOENT
    os.mkdir(m / "g")
    os.chown(m / "g", 0, 4321)
    os.chmod(m / "g", 0o2775)
    os.mkdir(m / "g" / "sub")
    (m / "g" / "file").write_text("x")
    assert (
        os.stat(m / "g" / "sub").st_gid == 4321 and os.stat(m / "g" / "sub").st_mode & stat.S_ISGID
    )
    assert os.stat(m / "g" / "file").st_gid == 4321


def test_chmod_chown_truncate_utimens(mfs: Mount):
    m = mfs.path
    (m / "f").write_bytes(b"x" * 1000)
    os.chmod(m / "f", 0o600)
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o600
    os.chown(m / "f", 42, -1)
    assert (os.stat(m / "f").st_uid, os.stat(m / "f").st_gid) == (42, 0)
    os.chown(m / "f", -1, 43)
    assert (os.stat(m / "f").st_uid, os.stat(m / "f").st_gid) == (42, 43)
    assert err(os.truncate, m / "missing", 0) == errno.ENOENT
    os.mkdir(m / "d")
    assert err(os.truncate, m / "d", 0) == errno.EISDIR
    assert err(os.truncate, m / "f", -1) == errno.EINVAL
    os.truncate(m / "f", 10)
    assert (m / "f").read_bytes() == b"x" * 10
    os.utime(m / "f", ns=(1_000_000_001, 2_000_000_002))
    st = os.stat(m / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    ctime = st.st_ctime_ns
    fd = os.open(m / "f", os.O_RDONLY)
    try:
        # UTIME_OMIT for the access time: only the modification time changes
        subprocess.run(["touch", "-m", "-d", "@3", str(m / "f")], check=True)
    finally:
        os.close(fd)
    st = os.stat(m / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_001, 3_000_000_000)
    assert st.st_ctime_ns >= ctime
    assert err(os.utime, m / "missing", None) == errno.ENOENT


def test_permissions_for_a_non_root_user(cluster4, make_mount, tmp_path):
    # a mountpoint every user can reach (pytest's own temporary tree is root-only)
    public = Path(tempfile.mkdtemp(prefix="mfs-perm-"))
    public.chmod(0o755)
    try:
        mfs = make_mount(cluster4, path=public / "mnt")
        public_mount_checks(mfs.path)
        mfs.close()
    finally:
        shutil.rmtree(public, ignore_errors=True)


def public_mount_checks(m: Path) -> None:
    (m / "secret").write_text("s")
    os.chmod(m / "secret", 0o600)
    for name, mode in (("closed", 0o755), ("open", 0o777), ("sticky", 0o1777)):
        os.mkdir(m / name)
        os.chmod(m / name, mode)  # not subject to the umask
    (m / "sticky" / "roots").write_text("r")
    assert errno_as_nobody(f"open({str(m / 'secret')!r}).read()") == "EACCES"
    assert errno_as_nobody(f"open({str(m / 'closed' / 'x')!r}, 'w')") == "EACCES"
    assert errno_as_nobody(f"os.mkdir({str(m / 'closed' / 'x')!r})") == "EACCES"
    assert errno_as_nobody(f"os.chmod({str(m / 'secret')!r}, 0o777)") == "EPERM"
    assert errno_as_nobody(f"os.chown({str(m / 'secret')!r}, {NOBODY}, -1)") == "EPERM"
    assert errno_as_nobody(f"os.unlink({str(m / 'sticky' / 'roots')!r})") in ("EPERM", "EACCES")
    assert errno_as_nobody(f"open({str(m / 'open' / 'mine')!r}, 'w').write('m')") == "OK"
    st = os.stat(m / "open" / "mine")
    assert (st.st_uid, st.st_gid) == (NOBODY, NOBODY)
    assert errno_as_nobody(f"os.chmod({str(m / 'open' / 'mine')!r}, 0o600)") == "OK"
    assert stat.S_IMODE(os.stat(m / "open" / "mine").st_mode) == 0o600


def test_enospc_when_full_and_usable_after_freeing(make_cluster, make_mount):
    c = make_cluster(4, format_args=("--block-size", "64K"), server_args=("--capacity", "4M"))
    mfs = make_mount(c)
    m = mfs.path
    total = os.statvfs(m).f_blocks * os.statvfs(m).f_frsize
    assert total == 2 * 4 * 1024 * 1024  # two pairs of 4 MiB servers
    chunk = os.urandom(64 << 10)
    written = 0
    with pytest.raises(OSError) as info, open(m / "fill", "wb") as f:  # noqa: PT012
        while True:
            f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
            written += len(chunk)
    assert info.value.errno == errno.ENOSPC
    assert 0 < written <= total
    os.unlink(m / "fill")
    (m / "after").write_bytes(chunk * 16)
    assert (m / "after").read_bytes() == chunk * 16


def test_directory_listing_and_stat_agree(mfs: Mount):
    m = mfs.path
    names = {f"file{i}" for i in range(300)}
    for n in names:
        (m / n).write_text(n)
    assert set(os.listdir(m)) == names
    with os.scandir(m) as it:
        for entry in it:
            assert entry.inode() == os.stat(m / entry.name).st_ino
            assert entry.is_file()
    assert len(list(Path(m).iterdir())) == 300


def test_names_that_are_not_utf8_fail_with_eilseq(cluster4, make_mount, tmp_path):
    """The volume stores names as UTF-8: any other bytes are refused with EILSEQ by every
    call, change nothing, and put no traceback in the mount's log."""
    log = tmp_path / "mount.log"
    mount = make_mount(cluster4, "--log", str(log))
    root = os.fsencode(mount.path)
    good, bad = root + b"/good", root + b"/\xff\xfe"
    with open(good, "wb") as f:
        f.write(b"kept")
    os.mkdir(root + b"/dir")
    calls = [
        (os.open, bad, os.O_CREAT | os.O_WRONLY, 0o644),
        (os.mkdir, root + b"/\xff"),
        (os.mkdir, root + b"/dir/caf\xe9"),  # Latin-1
        (os.mknod, bad),
        (os.stat, bad),
        (os.lstat, bad + b"/below"),
        (os.open, bad, os.O_RDONLY),
        (os.rename, good, bad),
        (os.rename, bad, root + b"/other"),
        (os.link, good, bad),
        (os.symlink, b"good", bad),
        (os.symlink, b"\x80target", root + b"/link"),
        (os.setxattr, good, b"user.\xff", b"value"),
        (os.getxattr, good, b"user.\xff"),
        (os.removexattr, good, b"user.\xff"),
        (os.unlink, bad),
        (os.rmdir, bad),
        (os.readlink, bad),
        (os.chmod, bad, 0o600),
        (os.truncate, bad, 0),
        (os.listdir, bad),
    ]
    for func, *args in calls:
        assert err(func, *args) == errno.EILSEQ, (func.__name__, args)
    os.rename(good, root + "/caf\u00e9".encode())  # UTF-8 names are names like any other
    expected = sorted([b"dir", "caf\u00e9".encode()])
    assert sorted(os.listdir(root)) == expected and os.listdir(root + b"/dir") == []
    mount.close()  # the volume is stored as it is seen, and read back so
    again = os.fsencode(make_mount(cluster4, "--log", str(log), name="again").path)
    assert sorted(os.listdir(again)) == expected
    with open(again + "/caf\u00e9".encode(), "rb") as f:
        assert f.read() == b"kept"
    assert "Traceback" not in log.read_text() and "error:" not in log.read_text()
