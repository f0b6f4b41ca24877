"""A live HTTP camera on loopback for tests and benches: an MPEG-TS feed served without a length, as IP cameras and
restreamers serve one, that can be switched off (`down`, its port closed) and on again (`up`, the same port)."""
from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 8192


class HttpCamera:
    """Serves `body` (an MPEG-TS file's bytes) at `url`.

    `seconds`: the feed's duration, delivered in as much wall time (real time); None sends it as fast as the client
    reads. `loop`: repeat the feed until the camera goes down (a live camera), else end the response after one pass.
    `port` 0 takes a free one on the first `up()` and keeps it. `connections` counts the requests served.
    """

    def __init__(self, body: bytes, *, seconds: float | None = None, loop: bool = True, port: int = 0) -> None:
        self.body, self.seconds, self.loop, self.port = body, seconds, loop, port
        self.httpd: ThreadingHTTPServer | None = None
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/cam.ts"

    def up(self) -> None:
        camera = self
        pause = 0.0 if self.seconds is None else self.seconds * CHUNK / len(self.body)  # per chunk, for real time

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                camera.connections += 1
                self.send_response(200)
                self.send_header("Content-Type", "video/mp2t")
                self.end_headers()
                mine = camera.httpd
                try:
                    while camera.httpd is mine:
                        for i in range(0, len(camera.body), CHUNK):
                            if camera.httpd is not mine:
                                break
                            self.wfile.write(camera.body[i:i + CHUNK])
                            if pause:
                                time.sleep(pause)
                        if not camera.loop:
                            break
                except OSError:  # the client hung up
                    pass
                self.close_connection = True

        ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def down(self) -> None:
        httpd, self.httpd = self.httpd, None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
