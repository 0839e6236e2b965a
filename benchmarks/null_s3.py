"""A null S3 endpoint: answers the S3 calls of an s3fs ``put`` and discards every byte sent.

What an s3fs client uploads to it per second is the most any S3 server could take in from that
client on this machine (the client's own cost: HTTP, signing, checksums), with the server's cost
at almost nothing. bench_shard sets it beside the local S3 server to show where the ceiling is.

    python -m benchmarks.null_s3 PORT      # serves on 127.0.0.1:PORT until killed
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

EMPTY_LISTING = (
    b'<?xml version="1.0" encoding="UTF-8"?>'
    b'<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
    b"<Name>bench</Name><Prefix></Prefix><KeyCount>0</KeyCount><MaxKeys>1000</MaxKeys>"
    b"<IsTruncated>false</IsTruncated></ListBucketResult>"
)
READ = 1 << 20


class NullS3(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as a real endpoint

    def _discard_body(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0:
            chunk = self.rfile.read(min(READ, left))
            if not chunk:
                break
            left -= len(chunk)

    def _answer(self, status: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def do_PUT(self) -> None:  # an object (or a bucket): taken, forgotten
        self._discard_body()
        self._answer(200, ETag='"0"')

    def do_HEAD(self) -> None:  # the bucket exists; no object does
        self._answer(200 if self.path.strip("/").count("/") == 0 else 404)

    def do_GET(self) -> None:  # every listing is empty
        self._answer(200, EMPTY_LISTING, Content_Type="application/xml")

    def do_POST(self) -> None:
        self._discard_body()
        self._answer(200)

    def do_DELETE(self) -> None:
        self._answer(204)

    def log_message(self, *args) -> None:
        pass


def main(argv=None) -> None:
    port = int((argv or sys.argv[1:])[0])
    ThreadingHTTPServer(("127.0.0.1", port), NullS3).serve_forever()


if __name__ == "__main__":
    main()
