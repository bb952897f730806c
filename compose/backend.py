"""The compose network's JSON-RPC backend: answers every POST with the JSON-RPC
result {"method", "params", "served_by"}, GET /status with "ok"."""

import json
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet
        pass

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._send(200, b'"ok"')

    def do_POST(self):
        n = int(self.headers.get("Content-Length", "0"))
        req = json.loads(self.rfile.read(n) or b"{}")
        res = {"jsonrpc": "2.0", "id": req.get("id"),
               "result": {"method": req.get("method"), "params": req.get("params"),
                          "served_by": socket.gethostname()}}
        self._send(200, json.dumps(res).encode())


ThreadingHTTPServer(("0.0.0.0", 8545), Handler).serve_forever()
