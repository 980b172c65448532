"""Ordinary shell tools on a real mount: what a user does first."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from helpers import Mount, cli, sha

MiB = 1 << 20


def sh(cmd: str, cwd: Path | None = None) -> str:
    res = subprocess.run(cmd, shell=True, capture_output=True, text=True, cwd=cwd, timeout=600)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def make_tree(root: Path, files: int) -> None:
    for i in range(files):
        d = root / f"d{i % 37}" / f"e{i % 5}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(os.urandom(i % 3000) + f"file {i}\n".encode())


def test_ls_stat_mkdir_rmdir_touch_cat(mfs: Mount):
    m = mfs.path
    sh(f"mkdir -p {m}/a/b/c && touch {m}/a/b/c/x && echo hello > {m}/a/y")
    assert sh(f"ls {m}/a").split() == ["b", "y"]
    assert sh(f"cat {m}/a/y") == "hello\n"
    st = os.stat(m / "a" / "y")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 6 and st.st_nlink == 1
    assert os.stat(m / "a").st_nlink == 3  # ., its entry, and b's ".."
    sh(f"rm {m}/a/b/c/x && rmdir {m}/a/b/c {m}/a/b")
    assert sh(f"ls -A {m}/a").split() == ["y"]


def cp_big_file_and_tree(mfs: Mount, tmp_path: Path, mib: int, files: int) -> None:
    big = tmp_path / "big"
    chunk = os.urandom(64 * MiB)
    with open(big, "wb") as f:
        for i in range(mib // 64):  # every 64 MiB piece different
            f.write(bytes([i % 256]) + chunk[1:])
    tree = tmp_path / "tree"
    make_tree(tree, files)
    try:
        sh(f"cp {big} {mfs.path}/big && cp -r {tree} {mfs.path}/tree")
        assert sha(mfs.path / "big") == sha(big)
        sh(f"diff -r {tree} {mfs.path}/tree")
        assert int(sh(f"find {mfs.path}/tree -type f | wc -l")) == files
    finally:
        big.unlink()
        (mfs.path / "big").unlink(missing_ok=True)


def test_cp_a_large_file_and_a_tree_of_small_files(mfs: Mount, tmp_path: Path):
    cp_big_file_and_tree(mfs, tmp_path, 256, 1000)


@pytest.mark.slow
def test_cp_a_few_gigabytes_and_a_large_tree(mfs: Mount, tmp_path: Path):
    cp_big_file_and_tree(mfs, tmp_path, 3 << 10, 5000)


def test_mv_within_across_onto_file_and_onto_empty_dir(mfs: Mount):
    m = mfs.path
    sh(f"mkdir {m}/d1 {m}/d2 {m}/empty && echo one > {m}/d1/a && echo two > {m}/d1/b")
    sh(f"mv {m}/d1/a {m}/d1/a2")  # within a directory
    sh(f"mv {m}/d1/a2 {m}/d2/a3")  # across directories
    old_ino = os.stat(m / "d2" / "a3").st_ino
    sh(f"mv -f {m}/d1/b {m}/d2/a3")  # onto an existing file
    assert sh(f"cat {m}/d2/a3") == "two\n" and os.stat(m / "d2" / "a3").st_ino != old_ino
    sh(f"mv -T {m}/d2 {m}/empty")  # a directory onto an empty directory
    assert sorted(os.listdir(m)) == ["d1", "empty"] and os.listdir(m / "empty") == ["a3"]


def test_rm_r_links_and_nlink(mfs: Mount):
    m = mfs.path
    sh(f"mkdir -p {m}/t/u && echo data > {m}/t/u/f && ln {m}/t/u/f {m}/t/g && ln -s u/f {m}/t/s")
    assert os.stat(m / "t" / "g").st_nlink == 2
    assert os.readlink(m / "t" / "s") == "u/f" and sh(f"cat {m}/t/s") == "data\n"
    sh(f"rm {m}/t/u/f")
    assert os.stat(m / "t" / "g").st_nlink == 1 and sh(f"cat {m}/t/g") == "data\n"
    sh(f"rm -r {m}/t")
    assert os.listdir(m) == []


def test_chmod_chown_and_nanosecond_times(mfs: Mount):
    m = mfs.path
    sh(f"touch {m}/f && chmod 4751 {m}/f")
    assert stat.S_IMODE(os.stat(m / "f").st_mode) == 0o4751
    sh(f"chown 1234:5678 {m}/f")
    st = os.stat(m / "f")
    # as on ext4: changing the owner of an executable drops set-user-ID, even for root
    assert stat.S_IMODE(st.st_mode) == 0o751 and (st.st_uid, st.st_gid) == (1234, 5678)
    sh(f"touch -d '2001-02-03 04:05:06.123456789 UTC' {m}/f")
    assert os.stat(m / "f").st_mtime_ns == 981173106_123456789
    os.utime(m / "f", ns=(5, 981173106_000000007))
    st = os.stat(m / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5, 981173106_000000007)


def test_truncate_sparse_append_and_overwrite(mfs: Mount):
    f = mfs.path / "f"
    f.write_bytes(b"a" * 3 * MiB)
    sh(f"truncate -s 100 {f}")
    assert f.read_bytes() == b"a" * 100
    sh(f"truncate -s 5M {f}")
    assert f.read_bytes() == b"a" * 100 + bytes(5 * MiB - 100)
    with open(f, "ab") as fh:
        fh.write(b"tail")
    with open(f, "r+b") as fh:
        fh.seek(2 * MiB + 5)
        fh.write(b"middle")
    data = f.read_bytes()
    assert len(data) == 5 * MiB + 4 and data.endswith(b"tail")
    assert data[2 * MiB + 5 : 2 * MiB + 11] == b"middle" and data[100 : 2 * MiB + 5] == bytes(
        2 * MiB + 5 - 100
    )
    sparse = mfs.path / "sparse"
    with open(sparse, "wb") as fh:
        fh.seek(50 * MiB)
        fh.write(b"x")
    st = os.stat(sparse)
    assert st.st_size == 50 * MiB + 1 and st.st_blocks * 512 < 4 * MiB
    with open(sparse, "rb") as fh:
        fh.seek(10 * MiB)
        assert fh.read(MiB) == bytes(MiB)


def test_df_du_find(mfs: Mount):
    m = mfs.path
    before = os.statvfs(m)
    assert before.f_blocks > 0 and before.f_bfree <= before.f_blocks
    (m / "d").mkdir()
    (m / "d" / "f").write_bytes(os.urandom(8 * MiB))
    after = os.statvfs(m)
    used = (before.f_bfree - after.f_bfree) * after.f_frsize
    assert used == 8 * MiB
    assert int(sh(f"du -sk {m}/d").split()[0]) >= 8 * 1024
    assert sh(f"find {m} -name f").split() == [f"{m}/d/f"]
    assert "mirrorfs" in sh(f"df {m}")


def test_tar_and_rsync_round_trips(mfs: Mount, tmp_path: Path):
    src = tmp_path / "src"
    make_tree(src, 300)
    os.symlink("d1/e1", src / "link")
    sh(f"tar -C {tmp_path} -cf {mfs.path}/src.tar src")
    out = tmp_path / "out"
    out.mkdir()
    sh(f"tar -C {out} -xf {mfs.path}/src.tar")
    sh(f"diff -r --no-dereference {src} {out}/src")
    sh(f"tar -C {mfs.path} -xf {mfs.path}/src.tar")
    sh(f"diff -r --no-dereference {src} {mfs.path}/src")
    sh(f"rsync -a {src}/ {mfs.path}/synced/")
    back = tmp_path / "back"
    sh(f"rsync -a {mfs.path}/synced/ {back}/")
    sh(f"diff -r --no-dereference {src} {back}")
    a, b = os.stat(src / "d3" / "e3" / "f3.txt"), os.stat(back / "d3" / "e3" / "f3.txt")
    assert a.st_mtime_ns // 10**9 == b.st_mtime_ns // 10**9 and a.st_mode == b.st_mode


def test_git_inside_the_mount(mfs: Mount):
    repo = mfs.path / "repo"
    repo.mkdir()
    env = "git -c user.name=t -c user.email=t@example.invalid"
    sh(f"git init -q && echo one > a && {env} add a && {env} commit -qm first", cwd=repo)
    sh(f"echo two >> a && {env} commit -qam second && git gc -q", cwd=repo)
    assert sh("git log --format=%s", cwd=repo).split() == ["second", "first"]
    sh("git fsck --strict", cwd=repo)


def test_sqlite_database_inside_the_mount(mfs: Mount):
    db = sqlite3.connect(mfs.path / "db.sqlite")
    db.execute("create table t (k integer primary key, v text)")
    with db:
        db.executemany("insert into t (v) values (?)", [(f"row {i}" * 20,) for i in range(5000)])
    with db:
        db.execute("delete from t where k % 3 = 0")
    db.close()
    db = sqlite3.connect(mfs.path / "db.sqlite")
    assert db.execute("select count(*) from t").fetchone()[0] == 5000 - 5000 // 3
    assert db.execute("pragma integrity_check").fetchone()[0] == "ok"
    db.close()


def test_extended_attributes(mfs: Mount):
    f = mfs.path / "f"
    f.write_text("x")
    sh(f"setfattr -n user.colour -v blue {f}")
    assert 'user.colour="blue"' in sh(f"getfattr -d {f}")
    os.setxattr(f, "user.bin", b"\x00\xff")
    assert os.getxattr(f, "user.bin") == b"\x00\xff"
    assert sorted(os.listxattr(f)) == ["user.bin", "user.colour"]
    os.removexattr(f, "user.colour")
    assert os.listxattr(f) == ["user.bin"]


def test_acls_and_security_labels_are_not_supported(mfs: Mount):
    """As on NFS: a definite EOPNOTSUPP (not ENODATA) for system.* and security.*, so
    getfacl and SELinux-aware tools see no support instead of labels that nothing
    enforces (the mount is nosuid: file capabilities would be ignored too), and ls -l
    asks once per file system instead of twice per file."""
    f = mfs.path / "f"
    f.write_text("x")
    d = mfs.path / "d"  # a directory takes both ACLs
    d.mkdir()
    # the kernel parses an ACL before passing it on: a valid one (rw-r--r--)
    acl = struct.pack("<I", 2) + b"".join(
        struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 6), (4, 4), (0x20, 4))
    )
    for name in (
        "system.posix_acl_access",
        "system.posix_acl_default",
        "security.selinux",
        "security.mirrorfs",
    ):
        for call, args in (
            (os.getxattr, (d, name)),
            (os.setxattr, (d, name, acl)),
            (os.removexattr, (d, name)),
        ):
            with pytest.raises(OSError) as exc:
                call(*args)
            assert exc.value.errno == errno.EOPNOTSUPP, (call.__name__, name)
    with pytest.raises(OSError) as exc:
        os.getxattr(f, "user.none")
    assert exc.value.errno == errno.ENODATA
    os.setxattr(f, "trusted.k", b"v")  # root's namespace stays
    assert os.getxattr(f, "trusted.k") == b"v" and os.listxattr(f) == ["trusted.k"]
    out = subprocess.run(["ls", "-l", str(mfs.path)], capture_output=True, text=True, check=True)
    assert out.stderr == "" and out.stdout.splitlines()[-1].endswith(" f")
    assert out.stdout.splitlines()[-2].startswith("drwx")


def test_open_file_stays_readable_after_unlink(mfs: Mount):
    f = mfs.path / "f"
    data = os.urandom(3 * MiB + 7)
    f.write_bytes(data)
    with open(f, "rb") as fh:
        os.unlink(f)
        assert not f.exists()
        assert fh.read() == data
        fh.seek(MiB)
        assert fh.read(10) == data[MiB : MiB + 10]
    assert os.listdir(mfs.path) == []


def test_everything_survives_unmount_and_remount(cluster4, make_mount, tmp_path: Path):
    m = make_mount(cluster4)
    make_tree(tmp_path / "tree", 200)
    sh(f"cp -r {tmp_path}/tree {m.path}/tree && ln -s tree {m.path}/l && mkdir {m.path}/e")
    os.setxattr(m.path / "e", "user.k", b"v")
    m.close()
    again = make_mount(cluster4, name="mnt2")
    sh(f"diff -r {tmp_path}/tree {again.path}/tree")
    assert (
        os.readlink(again.path / "l") == "tree" and os.getxattr(again.path / "e", "user.k") == b"v"
    )
    res = cli("fsck", *cluster4.args, "--deep")
    assert res.returncode == 0 and "clean" in res.stdout, res.stdout


def test_sequential_read_uses_both_mirrors_of_every_pair(cluster4, make_mount):
    m = make_mount(cluster4)
    data = os.urandom(64 * MiB)
    (m.path / "f").write_bytes(data)
    m.close()
    again = make_mount(cluster4, name="again")  # nothing cached
    before = [r["reads"] for r in cluster4.status()["rows"]]
    assert sha(again.path / "f") == hashlib.sha256(data).hexdigest()
    reads = [r["reads"] - b for r, b in zip(cluster4.status()["rows"], before, strict=True)]
    assert sum(reads) >= 64  # every block read once at least
    for a, b in ((0, 1), (2, 3)):  # read-ahead shares each pair's blocks between its mirrors
        assert min(reads[a], reads[b]) >= 0.3 * (reads[a] + reads[b]), reads
