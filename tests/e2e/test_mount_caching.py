"""What the inode-based client and its caches must keep right: an open file that was
unlinked, hard links as one inode, write-back, small files kept inline, df and du."""

from __future__ import annotations

import os
import random
import signal
import stat
import subprocess

from helpers import Mount, cli, drop_caches, wait_for


def test_an_open_unlinked_file_works_for_every_call_until_its_last_close(mfs: Mount):
    p = mfs.path / "gone"
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"x" * 100_000)
        os.unlink(p)
        assert not p.exists()
        st = os.fstat(fd)
        assert st.st_nlink == 0 and st.st_size == 100_000
        os.fchmod(fd, 0o600)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
        os.pwrite(fd, b"tail", 200_000)
        assert os.fstat(fd).st_size == 200_004
        assert os.pread(fd, 4, 200_000) == b"tail"
        assert os.pread(fd, 10, 99_995) == b"xxxxx" + bytes(5)
        os.ftruncate(fd, 50)
        assert os.fstat(fd).st_size == 50
        assert os.pread(fd, 100, 0) == b"x" * 50
        os.fsync(fd)
        os.utime(fd, ns=(10**18, 10**18))
        assert os.fstat(fd).st_mtime_ns == 10**18
    finally:
        os.close(fd)
    assert os.listdir(mfs.path) == []


def test_hard_links_are_one_inode_whose_cached_attributes_stay_right(mfs: Mount):
    a, b = mfs.path / "a", mfs.path / "b"
    a.write_bytes(b"1" * 10)
    os.stat(a)  # cached by the kernel
    os.link(a, b)
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(a).st_nlink == 2
    with open(b, "ab") as f:
        f.write(b"2" * 10)
    assert os.stat(a).st_size == 20 and a.read_bytes() == b"1" * 10 + b"2" * 10
    os.chmod(b, 0o600)
    assert stat.S_IMODE(os.stat(a).st_mode) == 0o600
    os.unlink(b)
    assert os.stat(a).st_nlink == 1


def test_random_small_writes_read_back_through_cold_caches(mfs: Mount):
    """Write-back coalesces 4 KiB writes per block; what goes out is the file."""
    rng = random.Random(7)
    size = 6 << 20
    model = bytearray(rng.randbytes(size))
    p = mfs.path / "r"
    p.write_bytes(model)
    with open(p, "r+b") as f:
        for _ in range(500):
            off = rng.randrange(0, size + 8192) & ~4095
            data = rng.randbytes(4096)
            f.seek(off)
            f.write(data)
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off : off + 4096] = data
            if rng.random() < 0.02:
                n = rng.randrange(size // 2, size)
                f.truncate(n)
                if n < len(model):
                    del model[n:]
                else:
                    model.extend(bytes(n - len(model)))
        f.flush()
        os.fsync(f.fileno())
    drop_caches()
    assert p.read_bytes() == bytes(model)
    mfs.close()
    again = Mount(mfs.cluster, mfs.path)
    try:
        assert (again.path / "r").read_bytes() == bytes(model)
    finally:
        again.close()


def test_small_files_live_in_the_metadata_and_df_du_count_real_bytes(mfs: Mount):
    before = os.statvfs(mfs.path)
    for i in range(200):
        (mfs.path / f"s{i}").write_bytes(b"y" * 100)
    big = mfs.path / "big"
    big.write_bytes(os.urandom(3 << 20))
    os.sync()
    after = os.statvfs(mfs.path)
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert 3 << 20 <= used <= (3 << 20) + 200 * 4096  # not 201 blocks of 1 MiB
    du = subprocess.run(["du", "-sk", str(mfs.path)], capture_output=True, text=True, check=True)
    assert int(du.stdout.split()[0]) <= 3 * 1024 + 200 * 4 + 64
    assert os.stat(mfs.path / "s0").st_blocks == 1  # 100 bytes: one 512-byte unit
    # the small files need no block server: with one pair gone they still read
    mfs.cluster.kill(0)
    mfs.cluster.kill(1)
    drop_caches()
    assert all((mfs.path / f"s{i}").read_bytes() == b"y" * 100 for i in range(200))


def test_a_small_file_grows_into_blocks_and_shrinks_back(mfs: Mount):
    p = mfs.path / "g"
    p.write_bytes(b"a" * 3000)
    with open(p, "ab") as f:
        f.write(b"b" * 100_000)
    drop_caches()
    assert p.read_bytes() == b"a" * 3000 + b"b" * 100_000
    os.truncate(p, 2000)
    drop_caches()
    assert p.read_bytes() == b"a" * 2000
    res = cli("get", *mfs.cluster.args, "/g", "-o", str(mfs.path.parent / "g.out"))
    assert res.returncode == 0, res.stderr
    assert (mfs.path.parent / "g.out").read_bytes() == b"a" * 2000


def test_sigterm_writes_out_what_was_pending_before_the_mount_ends(mfs: Mount):
    data = os.urandom(3 << 20)
    with open(mfs.path / "late", "wb") as f:  # closed, not fsynced: still in memory
        f.write(data)
    os.kill(mfs.pid, signal.SIGTERM)
    assert wait_for(lambda: not mfs.mounted(), 30)
    again = Mount(mfs.cluster, mfs.path.parent / "again")
    try:
        assert (again.path / "late").read_bytes() == data
    finally:
        again.close()


def test_a_big_file_unlinked_after_it_started_going_out_gives_its_space_back(mfs: Mount):
    free = os.statvfs(mfs.path).f_bfree
    with open(mfs.path / "big", "wb") as f:
        f.write(os.urandom(40 << 20))  # past 32 MiB: written out in the background
        f.flush()
        os.sync()  # the kernel hands its pages to the mount (no fsync: nothing waits)
        os.unlink(mfs.path / "big")
    assert wait_for(lambda: os.statvfs(mfs.path).f_bfree >= free, 20)
