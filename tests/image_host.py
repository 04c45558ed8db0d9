"""A web host for the image-fetching tests, run inside a network namespace (tests/test_reliability.py).

    python tests/image_host.py PORT LOG IMAGE

Serves IMAGE at /scene.png, redirects /to?url=URL, and appends "ADDRESS PATH" to LOG for every
request, ADDRESS being the local address the request reached (which of the host's addresses)."""

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

port, log_path, image_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
image = Path(image_path).read_bytes()
log = open(log_path, "a", buffering=1)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        log.write(f"{self.connection.getsockname()[0]} {self.path}\n")
        parts = urlsplit(self.path)
        if parts.path == "/scene.png":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)
        elif parts.path == "/to":
            self.send_response(302)
            self.send_header("Location", parse_qs(parts.query)["url"][0])
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args):  # the LOG above is the record
        pass


ThreadingHTTPServer(("0.0.0.0", port), Handler).serve_forever()
