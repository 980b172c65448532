"""A volume written by the previous version (format mirrorfs-1) mounts, reads back whole,
and is upgraded in place: the fixture holds real bytes that version wrote."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tarfile
from pathlib import Path

from helpers import Cluster, cli

from mirrorfuse.client.keys import Keyring
from mirrorfuse.wire.auth import KEY_NAME, new_key
from servers.files import read_key, write_key

FIXTURE = Path(__file__).with_name("data") / "mirrorfs-1-volume.tar.gz"


def manifest(root: Path) -> dict[str, dict]:
    """What a tree holds, as the fixture's manifest.json records it."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            p = Path(top) / name
            st = os.lstat(p)
            e: dict = {"mode": st.st_mode, "nlink": st.st_nlink, "size": st.st_size}
            if stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(p)
            elif stat.S_ISREG(st.st_mode):
                e["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
            names = os.listxattr(p, follow_symlinks=False)
            x = {k: os.getxattr(p, k, follow_symlinks=False).decode() for k in names}
            if x:
                e["xattrs"] = x
            out[str(p.relative_to(root))] = e
    return out


def test_a_volume_of_the_previous_version_mounts_and_reads_back_whole(tmp_path, make_mount):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path / "old", filter="data")
    want = json.loads((tmp_path / "old" / "manifest.json").read_text())
    # its checkpoint and the journal batches written after it are both of the old format
    assert json.loads((tmp_path / "old" / "d0" / "superblock.json").read_text())["format"] == (
        "mirrorfs-1"
    )
    assert (tmp_path / "old" / "d0" / "journal.log").stat().st_size > 0
    # that version had no keys: the volume gets one, given to its servers once
    volume = json.loads((tmp_path / "old" / "d0" / "superblock.json").read_text())["volume"]
    key_file = Keyring().path_for(volume)
    write_key(key_file, new_key())
    c = Cluster(tmp_path / "old", 4, server_args=("--key-file", str(key_file)))
    try:
        m = make_mount(c)
        assert manifest(m.path) == want
        (m.path / "new.txt").write_text("written by this version")
        m.close()
        sb = json.loads((tmp_path / "old" / "d0" / "superblock.json").read_text())
        assert sb["format"] == "mirrorfs-2" and "epoch" not in sb
        # each server keeps the key now: it starts without --key-file
        assert read_key(tmp_path / "old" / "d3" / KEY_NAME) == read_key(key_file)
        again = make_mount(c, name="again")  # now from a checkpoint of today's format
        got = manifest(again.path)
        assert got.pop("new.txt")["size"] == len("written by this version")
        assert got == want
        again.close()
        res = cli("fsck", *c.args, "--deep")
        assert res.returncode == 0 and "clean" in res.stdout, res.stdout
    finally:
        c.close()
