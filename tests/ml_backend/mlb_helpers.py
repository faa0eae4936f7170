"""Helpers shared by the ml_backend tests (a uniquely named module, importable from any test file)."""

from __future__ import annotations

import copy
import io
import json
import struct
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

FIXTURES = Path(__file__).parent / "fixtures"
SECRET_TOKEN = "tok-SECRET-0123456789abcdef"
ACCEPTED_TOKENS = {"REDACTED", SECRET_TOKEN}
IMAGE_SIZE = (96, 64)  # width, height of the images Label Studio served in the recordings


def load_fixture(name: str) -> dict[str, Any]:
    """The recorded request ``name`` (``setup``, ``predict_retrieve``, ...) with method, path, headers, body."""
    return json.loads((FIXTURES / f"{name}.json").read_text())


def fixture_body(name: str) -> Any:
    """A deep copy of the exact body Label Studio sent."""
    return copy.deepcopy(load_fixture(name)["body"])


def png_bytes(width: int, height: int, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    image = Image.new("RGB", (width, height), (20, 20, 20))
    pixels = np.array(image)
    pixels[height // 4 : height // 2, width // 4 : width // 2] = color
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1-bit greyscale PNG of width x height, all black: ~100 KB on disk, 900 M pixels decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte 0 + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    block = row * rows_per_block
    parts = [compressor.compress(block) for _ in range(height // rows_per_block)]
    parts.append(compressor.compress(row * (height % rows_per_block)))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


class ImageServer:
    """A tiny stand-in for Label Studio's media routes on 127.0.0.1, recording the requests it gets."""

    def __init__(self) -> None:
        self.png = png_bytes(*IMAGE_SIZE)
        self.bomb = png_bomb()
        self.requests: list[tuple[str, dict[str, str]]] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return

            def send(self, status: int, body: bytes, content_type: str = "image/png") -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                server.requests.append((self.path, dict(self.headers)))
                path = self.path
                if path.startswith("/storage-data/uploaded/"):
                    return self.send(400, b'{"detail": "use nginx"}', "application/json")
                if path.startswith("/data/upload/"):
                    auth = self.headers.get("Authorization", "")
                    if not auth.startswith("Token ") or auth[6:] not in ACCEPTED_TOKENS:
                        return self.send(401, b'{"detail": "no token"}', "application/json")
                    if path.endswith("notimage.png"):
                        return self.send(200, b"<html>not an image</html>", "text/html")
                    if path.endswith("bomb.png"):
                        return self.send(200, server.bomb)
                    if path.endswith("missing.png"):
                        return self.send(404, b"{}", "application/json")
                    return self.send(200, server.png)
                if path == "/public/ok.png":
                    return self.send(200, server.png)
                if path == "/public/huge.bin":
                    return self.send(200, b"\0" * (2 * 1024 * 1024), "application/octet-stream")
                if path == "/public/redirect-out":
                    self.send_response(302)
                    self.send_header("Location", "http://forbidden.invalid/x.png")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                if path == "/public/slow.png":
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(server.png)))
                    self.end_headers()
                    for i in range(0, len(server.png), 16):
                        try:
                            self.wfile.write(server.png[i : i + 16])
                            self.wfile.flush()
                        except OSError:
                            return None
                        time.sleep(0.2)
                    return None
                return self.send(404, b"{}", "application/json")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
