#!/usr/bin/env python3
"""A static file server that honours HTTP Range requests, for a disk image store.

`python3 -m http.server` ignores the Range header (Python 3.11 answers every GET with the
whole file, and no `Accept-Ranges`), and nbdkit's curl plugin refuses such a server: "server
does not support 'range' (byte range) requests". This is the same server with single byte
ranges (RFC 9110, section 14): `bytes=A-B`, `bytes=A-` and `bytes=-N` get 206 with
Content-Range; a range past the end gets 416; several ranges in one header are ignored and
the whole file is sent (as the RFC allows). Only regular files under DIRECTORY are served.

Usage: range_http_server.py [--bind ADDR] [--port PORT] [--directory DIR] [--rate BYTES_PER_S]
                            [--certfile PEM --keyfile PEM]

With `--certfile` and `--keyfile` it speaks HTTPS. It prints its base URL
(`http://ADDR:PORT/` or `https://...`) on stdout once it listens (`--port 0`, the
default, takes a free port). `--rate` caps the bytes per second sent over all requests
together: a slow store, for tests. One line per request on stderr, after its body was sent:
`GET /PATH STATUS start=S sent=N` (HEAD: `sent=0`; STATUS `aborted` when the client
went away during the body).
"""

import argparse
import functools
import http.server
import os
import re
import ssl
import sys
import threading
import time

SINGLE_RANGE = re.compile(r"bytes=(\d*)-(\d*)$")
CHUNK = 64 * 1024


class Throttle:
    """Spaces out chunks so that all requests together send at most `rate` bytes a second."""

    def __init__(self, rate):
        self.rate = rate
        self.lock = threading.Lock()
        self.next_free = time.monotonic()

    def wait_for(self, length):
        if not self.rate:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_free)
            self.next_free = start + length / self.rate
        time.sleep(max(0.0, start - now))


def parse_range(header, size):
    """(start, end, partial) for the Range header of a file of `size` bytes: one byte range
    (end inclusive, partial True), the whole file for a header that is not one plain byte
    range (partial False), or None for a range that starts past the end."""
    match = SINGLE_RANGE.match(header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        return (0, size - 1, False)
    first, last = match.groups()
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            return None
        return (max(0, size - suffix), size - 1, True)
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or start > end:
        return None
    return (start, end, True)


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """GET and HEAD of regular files, with byte ranges and HTTP/1.1 keep-alive."""

    protocol_version = "HTTP/1.1"
    throttle = Throttle(0)

    def send_head(self):
        self.start, self.length, self.sent, self.outcome = 0, 0, 0, 404
        path = self.translate_path(self.path)
        if not os.path.isfile(path):
            self.send_error(404, "Not a file")
            return None
        body = open(path, "rb")
        stat = os.fstat(body.fileno())
        span = (0, stat.st_size - 1, False)
        if "Range" in self.headers:
            span = parse_range(self.headers["Range"], stat.st_size)
            if span is None:
                body.close()
                return self.refuse_range(stat.st_size)
        status = 206 if span[2] else 200
        self.start, self.length = span[0], span[1] - span[0] + 1
        self.send_response_only(status)
        self.send_header("Date", self.date_time_string())
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(self.length))
        if status == 206:
            self.send_header("Content-Range", f"bytes {span[0]}-{span[1]}/{stat.st_size}")
        self.send_header("Last-Modified", self.date_time_string(stat.st_mtime))
        self.end_headers()
        self.outcome = status
        body.seek(self.start)
        return body

    def refuse_range(self, size):
        self.send_response_only(416)
        self.send_header("Content-Range", f"bytes */{size}")
        self.send_header("Content-Length", "0")
        self.end_headers()
        self.outcome = 416
        return None

    def copyfile(self, source, outputfile):
        remaining = self.length
        while remaining > 0:
            chunk = source.read(min(remaining, CHUNK))
            if not chunk:
                break
            self.throttle.wait_for(len(chunk))
            try:
                outputfile.write(chunk)
            except (BrokenPipeError, ConnectionResetError):
                self.outcome = "aborted"
                self.close_connection = True
                return
            self.sent += len(chunk)
            remaining -= len(chunk)

    def do_GET(self):
        super().do_GET()
        self.log_transfer()

    def do_HEAD(self):
        super().do_HEAD()
        self.log_transfer()

    def log_transfer(self):
        sys.stderr.write(
            f"{self.command} {self.path} {self.outcome} start={self.start} sent={self.sent}\n"
        )
        sys.stderr.flush()

    def log_request(self, code="-", size="-"):
        """Nothing: transfers are logged by log_transfer, errors by log_error."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--directory", default=os.getcwd())
    parser.add_argument("--rate", type=int, default=0, help="bytes per second, 0: unlimited")
    parser.add_argument("--certfile", help="the server's certificate (PEM): serve HTTPS")
    parser.add_argument("--keyfile", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    RangeHandler.throttle = Throttle(args.rate)
    handler = functools.partial(RangeHandler, directory=args.directory)
    server = http.server.ThreadingHTTPServer((args.bind, args.port), handler)
    scheme = "http"
    if args.certfile:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    host, port = server.server_address[:2]
    print(f"{scheme}://{host}:{port}/", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
