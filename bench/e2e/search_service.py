"""A stand-in for a web search API: a real HTTP service on loopback that
answers from the gateway's own full-text index, after a latency drawn from a
stated distribution (the part of a web search that partial execution hides).

Latency: lognormal with median 0.8 s and sigma 0.35 (so p10 ≈ 0.5 s, p90 ≈
1.25 s), capped at 3 s: the range commercial web search APIs answer in. A
query's latency is a function of its text and a fixed seed, so the partial
and the sequential run of one request wait exactly as long.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sqlite3
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MEDIAN_S = 0.8
SIGMA = 0.35
CAP_S = 3.0


def latency(query: str, seed: int = 0) -> float:
    """The query's latency: the same for the same text, in either mode."""
    digest = hashlib.sha256(f"{seed}:{query}".encode()).digest()
    rng = random.Random(int.from_bytes(digest[:8], "big"))
    return min(CAP_S, math.exp(math.log(MEDIAN_S) + SIGMA * rng.gauss(0, 1)))


class SearchService:
    """Serves GET /search?q=&k= as JSON {"results": [...]} on 127.0.0.1."""

    def __init__(self, index_path: str, seed: int = 0):
        self.index_path = index_path
        self.seed = seed
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (the stdlib's name)
                url = urllib.parse.urlparse(self.path)
                params = urllib.parse.parse_qs(url.query)
                query = params.get("q", [""])[0]
                k = int(params.get("k", ["3"])[0])
                time.sleep(latency(query, service.seed))
                body = json.dumps({"results": service.lookup(query, k)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/search"

    def lookup(self, query: str, k: int) -> list[dict]:
        words = [w for w in "".join(c if c.isalnum() else " " for c in query).split() if w]
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in words)
        with sqlite3.connect(f"file:{self.index_path}?mode=ro", uri=True) as db:
            rows = db.execute(
                "SELECT title, snippet(docs, 1, '', '', '…', 12) FROM docs "
                "WHERE docs MATCH ? ORDER BY rank LIMIT ?",
                (match, k),
            ).fetchall()
        return [{"title": t, "snippet": s, "url": f"pydoc:{t}"} for t, s in rows]

    def __enter__(self) -> SearchService:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
