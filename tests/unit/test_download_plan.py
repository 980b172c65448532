"""The downloader in one process, with sources of our own: segments sized to the file,
resume from any state file (or a clean refusal), one save of the state at a time."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from pathlib import Path

import pytest
import xxhash

from mirrorfuse.core.scheduler import Segment, split
from mirrorfuse.transfer import download as download_mod
from mirrorfuse.transfer.download import LEGACY_SEGMENT, Download
from mirrorfuse.transfer.sources import Info, Source
from mirrorfuse.wire.errors import MirrorfsError

KiB, MiB = 1 << 10, 1 << 20


class MemorySource(Source):
    """Serves ``data`` after ``delay`` seconds a read; counts the bytes it was asked for."""

    def __init__(self, name: str, data: bytes, delay: float = 0.0) -> None:
        self.name = name
        self.data = data
        self.delay = delay
        self.sent = 0

    async def info(self) -> Info:
        return Info(len(self.data), xxhash.xxh3_64_intdigest(self.data))

    async def read(self, seg: Segment) -> bytes:
        self.sent += seg.length  # a server sends it even when the reader cancels
        await asyncio.sleep(self.delay)
        return self.data[seg.start : seg.end]


def quiet(*_: object) -> None:
    pass


def new(tmp_path: Path, sources: list[Source], resume: bool = False, **kw) -> Download:
    return Download(sources, tmp_path / "out.bin", 3600, resume, say=quiet, **kw)


def write_state(dl: Download, **state: object) -> None:
    dl.partial.write_bytes(b"")
    dl.state_path.write_text(json.dumps(state))


def bitmap(done: set[int], count: int) -> str:
    bits = bytearray((count + 7) // 8)
    for i in done:
        bits[i // 8] |= 1 << (i % 8)
    return base64.b64encode(bytes(bits)).decode()


def test_a_new_download_is_cut_for_its_sources(tmp_path):
    dl = new(tmp_path, [])
    segments, done = dl.plan(2 * MiB, None, 4)
    assert len(segments) == 32 and {s.length for s in segments} == {64 * KiB} and not done
    segments, _ = dl.plan(2 * MiB, None, 1)
    assert len(segments) == 8
    fixed = new(tmp_path, [], segments=lambda size: split(size, MiB))
    assert len(fixed.plan(2 * MiB, None, 4)[0]) == 2  # a volume's blocks stay its blocks


def test_resume_keeps_the_saved_segment_size_whatever_sources_answer(tmp_path):
    dl = new(tmp_path, [], resume=True)
    write_state(
        dl,
        size=2 * MiB,
        checksum=7,
        segments=32,
        segment_size=64 * KiB,
        done=bitmap({0, 5, 31}, 32),
    )
    segments, done = dl.plan(2 * MiB, 7, 1)  # now one source: the old size still
    assert segments == split(2 * MiB, 64 * KiB) and done == {0, 5, 31}


def test_resume_of_a_state_written_before_segments_were_sized(tmp_path):
    dl = new(tmp_path, [], resume=True)
    write_state(dl, size=3 * MiB + 5, checksum=None, segments=4, done=bitmap({1, 3}, 4))
    segments, done = dl.plan(3 * MiB + 5, 9, 4)
    assert segments == split(3 * MiB + 5, LEGACY_SEGMENT) and done == {1, 3}


@pytest.mark.parametrize(
    "state, fragment",
    [
        ({"size": MiB, "checksum": 1, "segments": 16, "segment_size": 64 * KiB}, "another file"),
        (
            {"size": 2 * MiB, "checksum": 2, "segments": 16, "segment_size": 64 * KiB},
            "another file",
        ),
        ({"size": 2 * MiB, "checksum": 1, "segments": 5, "segment_size": 64 * KiB}, "cut into 5"),
        ({"size": 2 * MiB, "checksum": 1, "segments": 9}, "cut into 9"),  # old, not 1 MiB each
        ({"size": 2 * MiB, "checksum": 1, "segments": 32, "segment_size": "x"}, "damaged"),
        ({"size": 2 * MiB, "checksum": 1, "segment_size": 64 * KiB}, "damaged"),
    ],
)
def test_a_resume_that_cannot_fit_is_refused_in_one_line(tmp_path, state, fragment):
    dl = new(tmp_path, [], resume=True)
    write_state(dl, done="", **state)
    with pytest.raises(MirrorfsError, match=fragment) as err:
        dl.plan(2 * MiB, 1, 4)
    assert "start again without -r" in str(err.value)


def test_a_volume_file_resumes_in_its_blocks_from_an_old_state_too(tmp_path):
    dl = new(tmp_path, [], resume=True, segments=lambda size: split(size, 4 * MiB))
    write_state(dl, size=9 * MiB, checksum=None, segments=3, done=bitmap({2}, 3))
    assert dl.plan(9 * MiB, None, 4) == (split(9 * MiB, 4 * MiB), {2})


def test_a_resume_of_a_volume_file_with_other_blocks_is_refused(tmp_path):
    dl = new(tmp_path, [], resume=True, segments=lambda size: split(size, 4 * MiB))
    write_state(dl, size=8 * MiB, checksum=None, segments=8, segment_size=MiB, done="")
    with pytest.raises(MirrorfsError, match="cut into 8 segments of 1.0 MiB"):
        dl.plan(8 * MiB, None, 4)


def test_equal_sources_share_a_small_file_and_send_each_byte_once(tmp_path):
    data = bytes(range(256)) * (8 * KiB)  # 2 MiB
    sources = [MemorySource(f"s{i}", data, 0.05) for i in range(4)]
    assert asyncio.run(new(tmp_path, list(sources)).run()) == 0
    assert (tmp_path / "out.bin").read_bytes() == data
    assert [s.sent for s in sources] == [512 * KiB] * 4


def test_the_state_is_saved_by_one_writer_at_a_time(tmp_path, monkeypatch):
    """The saver's last save, still running in its thread when the transfer ends, and the
    final save both wrote OUTPUT.mfs-state.tmp: one rename found it gone."""
    monkeypatch.setattr(download_mod, "SAVE_EVERY", 0.05)
    writing, most = [0], [0]
    lock = threading.Lock()
    real_save = Download.save

    def slow_save(self: Download, fd: int, state: bytes) -> None:
        with lock:
            writing[0] += 1
            most[0] = max(most[0], writing[0])
        try:
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.5)  # the periodic save outlives the transfer
            real_save(self, fd, state)
        finally:
            with lock:
                writing[0] -= 1

    monkeypatch.setattr(Download, "save", slow_save)
    data = bytes(1 * MiB)
    sources = [MemorySource(f"s{i}", data, 0.05) for i in range(2)]
    assert asyncio.run(new(tmp_path, list(sources)).run()) == 0
    assert most[0] == 1
    assert (tmp_path / "out.bin").read_bytes() == data
    assert not (tmp_path / "out.bin.mfs-state").exists()
