#!/usr/bin/env python3
"""HTTP clients for the downloader, measured on the same mirrors: which one to read ranges with.

    .venv/bin/python bench/http_clients.py [--size 512M] [--mirrors 1,2,4] [--rounds 3]

Needs nginx (apt-get install nginx-light) and the bench extra
(pip install -e '.[bench]': aiohttp, pycurl). Every client does the same job
in this process: the file from N nginx "mirrors" in 1 MiB Range requests,
two keep-alive connections per mirror, each range written at its offset into
a new output file. Only the transfer is timed (no start-up, no checksum).

  aiohttp        the downloader's client until now: read() a range, pwrite it
  aiohttp-chunks the same, pwrite each chunk as it comes (no join)
  pycurl-multi   libcurl's multi interface, a write callback that pwrites each chunk
  http.client    the standard library in threads, readinto a buffer per thread, pwrite
  mirrorfs       transfer/httpfetch.py in threads: splice from the socket into the file
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirrors import fresh, make_file, missing, nginx  # noqa: E402

from mirrorfuse.tools.spawn import free_base_port  # noqa: E402
from mirrorfuse.transfer.httpfetch import HttpFetcher  # noqa: E402
from mirrorfuse.wire.sizes import human, parse_size  # noqa: E402

SEG = 1 << 20
PER_MIRROR = 2

Job = tuple[list[str], int, int]  # urls, size, output fd


def ranges(size: int) -> list[tuple[int, int]]:
    return [(s, min(s + SEG, size)) for s in range(0, size, SEG)]


def in_threads(urls: list[str], size: int, work: Callable[[str, list], None]) -> None:
    todo = ranges(size)
    threads = [
        threading.Thread(target=work, args=(u, todo)) for _ in range(PER_MIRROR) for u in urls
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


TAKING = threading.Lock()


def take(todo: list) -> tuple[int, int] | None:
    with TAKING:
        return todo.pop() if todo else None


def with_aiohttp(job: Job, chunks: bool = False) -> None:
    import aiohttp

    urls, size, fd = job

    async def main() -> None:
        todo = ranges(size)
        async with aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=PER_MIRROR)
        ) as s:

            async def worker(url: str) -> None:
                while todo:
                    start, end = todo.pop()
                    hdr = {"Range": f"bytes={start}-{end - 1}"}
                    async with s.get(url, headers=hdr) as r:
                        if not chunks:
                            os.pwrite(fd, await r.read(), start)
                            continue
                        pos = start
                        async for chunk in r.content.iter_any():
                            os.pwrite(fd, chunk, pos)
                            pos += len(chunk)

            await asyncio.gather(*(worker(u) for u in urls for _ in range(PER_MIRROR)))

    import uvloop

    uvloop.run(main())


def with_pycurl(job: Job) -> None:
    import pycurl

    urls, size, fd = job
    todo = ranges(size)
    multi = pycurl.CurlMulti()
    handles = []
    for url in urls:
        for _ in range(PER_MIRROR):
            h = pycurl.Curl()
            h.setopt(pycurl.URL, url)
            h.setopt(pycurl.BUFFERSIZE, 512 << 10)
            h.pos = 0

            def write(data: bytes, h=h) -> None:
                os.pwrite(fd, data, h.pos)
                h.pos += len(data)

            h.setopt(pycurl.WRITEFUNCTION, write)
            handles.append(h)

    def start(h) -> bool:
        if not todo:
            return False
        s, e = todo.pop()
        h.pos = s
        h.setopt(pycurl.RANGE, f"{s}-{e - 1}")
        multi.add_handle(h)
        return True

    running = sum(start(h) for h in handles)
    while running:
        multi.select(1.0)
        while True:
            ret, _ = multi.perform()
            if ret != pycurl.E_CALL_MULTI_PERFORM:
                break
        _, ok, failed = multi.info_read()
        for h in ok:
            multi.remove_handle(h)
            running -= 1
            running += start(h)
        if failed:
            raise SystemExit(f"pycurl: {failed}")
    for h in handles:
        h.close()


def with_http_client(job: Job) -> None:
    urls, size, fd = job

    def work(url: str, todo: list) -> None:
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port)
        buf = memoryview(bytearray(SEG))
        while (r := take(todo)) is not None:
            conn.request("GET", u.path, headers={"Range": f"bytes={r[0]}-{r[1] - 1}"})
            resp = conn.getresponse()
            view, got = buf[: r[1] - r[0]], 0
            while got < len(view):
                got += resp.readinto(view[got:])
            os.pwrite(fd, view, r[0])
        conn.close()

    in_threads(urls, size, work)


def with_httpfetch(job: Job) -> None:
    urls, size, fd = job

    def work(url: str, todo: list) -> None:
        f = HttpFetcher(url, 10.0)
        while (r := take(todo)) is not None:
            f.fetch(r[0], r[1] - r[0], fd)
        f.close()

    in_threads(urls, size, work)


CLIENTS: dict[str, Callable[[Job], None]] = {
    "aiohttp": with_aiohttp,
    "aiohttp-chunks": lambda job: with_aiohttp(job, chunks=True),
    "pycurl-multi": with_pycurl,
    "http.client": with_http_client,
    "mirrorfs": with_httpfetch,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="512M")
    p.add_argument("--mirrors", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    size = parse_size(args.size)
    counts = [int(x) for x in args.mirrors.split(",")]
    if gone := missing("nginx"):
        print(f"{', '.join(gone)} missing (apt-get install nginx-light)", file=sys.stderr)
        return 1
    times: dict[tuple[str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="mfs-httpbench-") as tmp:
        tmp = Path(tmp)
        tmp.chmod(0o755)
        (tmp / "www").mkdir()
        src = tmp / "www" / "file.bin"
        make_file(src, size)
        want = src.read_bytes()
        out = tmp / "out"
        out.mkdir()
        base = free_base_port(max(counts))
        with nginx(tmp, list(range(base, base + max(counts)))) as urls:
            time.sleep(0.5)
            for _ in range(args.rounds):
                for n in counts:
                    for name, client in CLIENTS.items():
                        fresh(out)
                        os.sync()
                        fd = os.open(out / name, os.O_RDWR | os.O_CREAT, 0o644)
                        os.ftruncate(fd, size)
                        t0 = time.perf_counter()
                        client((urls[:n], size, fd))
                        times.setdefault((name, n), []).append(time.perf_counter() - t0)
                        os.close(fd)
                        if (out / name).read_bytes() != want:
                            raise SystemExit(f"{name} wrote other bytes than the mirrors serve")
            fresh(out)
    mb = size / 1e6
    print(f"one {human(size)} file from N nginx mirrors on loopback, 1 MiB ranges, ")
    print(f"{PER_MIRROR} connections per mirror; MB/s, median of {args.rounds} (higher is better)")
    print(f"{'client':>15} " + " ".join(f"{f'{n} mirror(s)':>12}" for n in counts))
    for name in CLIENTS:
        cells = " ".join(f"{mb / statistics.median(times[name, n]):12.0f}" for n in counts)
        print(f"{name:>15} {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
