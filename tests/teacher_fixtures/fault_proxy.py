"""A fault-injecting HTTP proxy for the teacher tests (loopback only).

One request per client connection. For `POST .../chat/completions` the proxy takes the next entry of a
cyclic fault schedule and either forwards the request to the upstream server (`ok`) or injects a fault:
`429` (with `Retry-After`), `500`, `503`, `reset` (TCP RST, nothing forwarded) or `stall` (holds the
connection silently for `stall_s` seconds, longer than the client's timeout, then closes it). Every
request is logged (in memory and as JSON lines) with its fault and the cache keys the client announced in
`X-Imitation-Cache-Keys`; the Authorization header is never logged — only whether it matched `expect_auth`.
"""
import asyncio, json, socket, struct, threading, time
from pathlib import Path

DEFAULT_SCHEDULE = ["ok", "429", "ok", "500", "reset", "ok", "503", "ok", "stall", "ok"]  # 50% faults

class FaultProxy:
    def __init__(self, upstream_port, schedule=None, stall_s=10.0, retry_after=1, log_path=None, expect_auth=None):
        self.upstream_port, self.stall_s, self.retry_after = upstream_port, stall_s, retry_after
        self.schedule = list(schedule or ["ok"])
        self.log_path = Path(log_path) if log_path else None
        self.expect_auth = expect_auth
        self.events, self.n_chat = [], 0
        self.lock = threading.Lock()
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0)); self.port = s.getsockname()[1]
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True); self.thread.start()
        self._ready.wait(10)

    @property
    def base_url(self): return f"http://127.0.0.1:{self.port}/v1"

    def set_schedule(self, schedule):
        with self.lock: self.schedule, self.n_chat = list(schedule), 0

    def _run(self):
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    def stop(self):
        def _close():
            self.server.close()
            for t in asyncio.all_tasks(self.loop): t.cancel()
            self.loop.stop()
        self.loop.call_soon_threadsafe(_close); self.thread.join(10)

    def _log(self, ev):
        with self.lock:
            self.events.append(ev)
            if self.log_path:
                with open(self.log_path, "a") as f: f.write(json.dumps(ev) + "\n")

    async def _handle(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            writer.close(); return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for l in lines[1:]:
            if ":" in l:
                k, v = l.split(":", 1); headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0") or 0))
        fault = "ok"
        if method == "POST" and path.endswith("/chat/completions"):
            with self.lock:
                fault = self.schedule[self.n_chat % len(self.schedule)]; self.n_chat += 1
            ev = {"t": time.time(), "fault": fault, "keys": [k for k in headers.get("x-imitation-cache-keys", "").split(",") if k]}
            if self.expect_auth is not None:
                ev["auth_matches"] = headers.get("authorization") == f"Bearer {self.expect_auth}"
            self._log(ev)
        try:
            if fault in ("429", "500", "503"):
                msg = json.dumps({"error": {"message": f"injected {fault}", "type": "server_error", "param": None, "code": fault}}).encode()
                extra = f"Retry-After: {self.retry_after}\r\n" if fault == "429" else ""
                writer.write(f"HTTP/1.1 {fault} Injected\r\nContent-Type: application/json\r\nContent-Length: {len(msg)}\r\n"
                             f"{extra}Connection: close\r\n\r\n".encode() + msg)
                await writer.drain(); writer.close(); return
            if fault == "reset":
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort(); return
            if fault == "stall":
                await asyncio.sleep(self.stall_s); writer.transport.abort(); return
            # forward, one request per upstream connection
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            new_head = [lines[0]] + [l for l in lines[1:] if l and not l.lower().startswith("connection:")] + ["Connection: close", "", ""]
            uw.write("\r\n".join(new_head).encode("latin-1") + body); await uw.drain()
            resp = await ur.read()
            uw.close()
            h, _, b = resp.partition(b"\r\n\r\n")
            if b"connection: close" not in h.lower(): h += b"\r\nConnection: close"
            writer.write(h + b"\r\n\r\n" + b); await writer.drain(); writer.close()
        except (ConnectionError, asyncio.CancelledError):
            writer.transport.abort()

    # -- queries used by the tests ------------------------------------------------------------------
    def chat_events(self, since=0): return [e for e in self.events[since:]]
    def ok_keys(self, since=0):
        out = []
        for e in self.events[since:]:
            if e["fault"] == "ok": out += e["keys"]
        return out
