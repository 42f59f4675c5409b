"""A local stand-in for EC2's instance metadata service (IMDSv2) on 127.0.0.1, as AWS documents it: a session token
from `PUT /latest/api/token` (TTL header required), every read with that token (401 without), `instance-life-cycle`,
and `spot/instance-action`, 404 until a notice is given (not collected)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN = "AQAEAMetadataSessionToken=="


class InstanceMetadata:
    """Serve an instance's metadata; `give_notice(t)` announces a termination at epoch second `t`."""

    def __init__(self, life_cycle: str = "spot") -> None:
        self.life_cycle, self.action = life_cycle, None
        self.tokens = self.reads = self.refused = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str = "") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_PUT(self) -> None:
                if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
                    return self._send(400)
                server.tokens += 1
                self._send(200, TOKEN)

            def do_GET(self) -> None:
                if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    server.refused += 1
                    return self._send(401)
                server.reads += 1
                if self.path == "/latest/meta-data/instance-life-cycle":
                    return self._send(200, server.life_cycle)
                if self.path == "/latest/meta-data/spot/instance-action" and server.action:
                    return self._send(200, json.dumps(server.action))
                self._send(404, "Not Found")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def give_notice(self, at_s: float, action: str = "terminate") -> str:
        """Announce the interruption; the time as EC2 writes it (UTC, whole seconds, Z)."""
        when = datetime.fromtimestamp(int(at_s), timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.action = {"action": action, "time": when}
        return when

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
