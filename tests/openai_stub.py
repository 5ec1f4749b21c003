"""A loopback OpenAI-compatible server for tests and bench/ (stdlib only): POST /v1/chat/completions.

Knobs: `responder(prompt) -> str` decides the answer; `faults[substring]` is a list of faults ("429", "500",
"slow") served, in order, to requests whose prompt contains `substring` before it answers normally; `delay` adds
latency to every request; `slow_s` is how long a "slow" fault sleeps. It counts requests per prompt, records the
Authorization headers it saw, and tracks the largest number of requests in flight at once.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


def default_responder(prompt: str) -> str:
    test_line = next((ln for ln in prompt.splitlines() if ln.startswith(("Neighbourhood test:", "Relation test:"))), "")
    if "GARBLE" in test_line:
        return "Hmm, it depends on the context."
    return "Related." if "RELATED" in test_line else "unrelated"


class OpenAIStub:
    def __init__(self, responder: Callable[[str], str] = default_responder, delay: float = 0.0, slow_s: float = 2.0):
        self.responder = responder
        self.delay = delay
        self.slow_s = slow_s
        self.faults: dict[str, list[str]] = {}
        self.counts: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.auth_headers: set[str] = set()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # quiet
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                with stub._lock:
                    stub.statuses[status] += 1

            def do_POST(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                req = json.loads(self.rfile.read(length) or b"{}")
                if self.path.rstrip("/") != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                prompt = req["messages"][-1]["content"]
                with stub._lock:
                    stub.counts[prompt] += 1
                    stub.auth_headers.add(self.headers.get("Authorization", ""))
                    stub.in_flight += 1
                    stub.max_in_flight = max(stub.max_in_flight, stub.in_flight)
                    fault = None
                    for sub, queue in stub.faults.items():
                        if sub in prompt and queue:
                            fault = queue.pop(0)
                            break
                try:
                    if stub.delay:
                        time.sleep(stub.delay)
                    if fault == "429":
                        return self._send(429, {"error": {"message": "Rate limit reached", "type": "rate_limit"}},
                                          {"Retry-After": "0"})
                    if fault == "500":
                        return self._send(500, {"error": {"message": "internal error", "type": "server_error"}})
                    if fault == "401":
                        return self._send(401, {"error": {"message": "bad key", "type": "invalid_request_error"}})
                    if fault in ("empty", "null"):  # a 200 without a model answer
                        return self._send(200, {
                            "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": req.get("model"),
                            "choices": [] if fault == "empty" else [
                                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": None}}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}})
                    if fault == "slow":
                        time.sleep(stub.slow_s)
                    answer = stub.responder(prompt)
                    pt, ct = max(1, len(prompt) // 4), max(1, len(answer) // 4)
                    self._send(200, {
                        "id": "chatcmpl-stub", "object": "chat.completion", "created": 0, "model": req.get("model"),
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": answer}}],
                        "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct}})
                finally:
                    with stub._lock:
                        stub.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def start(self) -> "OpenAIStub":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "OpenAIStub":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
