"""A loopback HTTP server for tests and benchmarks: serves a directory on 127.0.0.1 with Range support (what object
stores give, and what a seekable header scan over HTTP needs), counts the bytes it sends, and stops on exit.

    with serve_directory(folder) as server:
        url = server.url + "/00000.tar"
        ...
        server.bytes_sent  # bytes of file data sent so far (server.bytes_by_file: per file name)
"""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import threading
from collections.abc import Iterator

_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")


class _Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    def do_GET(self):
        self._send(body=True)

    def do_HEAD(self):
        self._send(body=False)

    def _send(self, body: bool) -> None:
        path = self.translate_path(self.path.split("?", 1)[0])
        if not os.path.isfile(path):
            self.send_error(404, "not found")
            return
        size = os.path.getsize(path)
        start, end = 0, size - 1
        match = _RANGE.match(self.headers.get("Range", ""))
        status = 200
        if match and size:
            first, last = match.groups()
            if first:
                start, end = int(first), min(int(last), size - 1) if last else size - 1
            else:
                start, end = max(0, size - int(last)), size - 1
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
        length = max(0, end - start + 1)
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if not body:
            return
        with open(path, "rb") as file:
            file.seek(start)
            remaining = length
            while remaining:
                chunk = file.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                remaining -= len(chunk)
                with self.server.lock:
                    self.server.bytes_sent += len(chunk)
                    name = os.path.basename(path)
                    self.server.bytes_by_file[name] = self.server.bytes_by_file.get(name, 0) + len(chunk)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True


@contextlib.contextmanager
def serve_directory(directory: str | os.PathLike, timeout_s: float = 600.0) -> Iterator[_Server]:
    """Serve `directory` on 127.0.0.1 (a free port) in a daemon thread until the block exits (or `timeout_s`)."""
    handler = lambda *args, **kwargs: _Handler(*args, directory=str(directory), **kwargs)  # noqa: E731
    server = _Server(("127.0.0.1", 0), handler)
    server.bytes_sent, server.bytes_by_file, server.lock = 0, {}, threading.Lock()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    timer = threading.Timer(timeout_s, server.shutdown)
    timer.daemon = True
    timer.start()
    try:
        yield server
    finally:
        timer.cancel()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def main() -> None:
    """`python tests/shard_server.py DIR [SECONDS]`: serve DIR (with Range support), print the URL, stop after SECONDS
    (default 600) or on SIGTERM. The benchmark runs it in a process of its own, so that serving does not share the GIL
    with the reader being measured."""
    import signal
    import sys
    import time

    directory, seconds = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 600.0
    signal.signal(signal.SIGTERM, lambda *args: sys.exit(0))
    with serve_directory(directory, timeout_s=seconds) as server:
        print(server.url, flush=True)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)


if __name__ == "__main__":
    main()
