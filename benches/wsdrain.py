"""Idle WebSocket clients over TLS that time a proxy's drain (the "drain"
phase of benches/compare.py).

Thousands of connections are held by one process with non-blocking sockets
and one epoll selector: a thread per connection would cost more memory and
scheduling noise than the proxy being measured. Each client behaves as a
well-mannered browser would: it answers Pings, answers the server's Close
with a masked Close carrying the same code, and then waits for the server to
close the TCP connection, which is when the closing handshake is over for
the server.

Times are taken when the event loop handles a connection's bytes, so they are
late by at most the longest event batch, which is reported alongside them.
"""

from __future__ import annotations

import base64
import collections
import errno
import hashlib
import math
import os
import resource
import selectors
import socket
import ssl
import time

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# Connection states, in the order a connection goes through them.
CONNECTING, TLS, UPGRADING, OPEN, CLOSING = range(5)

OP_CLOSE, OP_PING, OP_PONG = 0x8, 0x9, 0xA

_EXIT = object()  # selector data of the watched process's pidfd


class Client:
    __slots__ = ("fd", "sock", "state", "events", "rbuf", "wbuf", "key", "close_at", "code", "pings")

    def __init__(self, sock: socket.socket) -> None:
        self.fd = sock.fileno()
        self.sock = sock
        self.state = CONNECTING
        self.events = 0
        self.rbuf = bytearray()
        self.wbuf = bytearray()
        self.key = b""
        self.close_at: float | None = None
        self.code: int | None = None
        self.pings = 0


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """A client frame: RFC 6455 requires clients to mask everything they send."""
    assert len(payload) <= 125, "control frames only"
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def next_frame(buf: bytearray) -> tuple[int, bytes] | None:
    """Removes one whole frame from `buf` and returns (opcode, payload), or
    None while the frame is incomplete."""
    if len(buf) < 2:
        return None
    opcode, length, pos = buf[0] & 0x0F, buf[1] & 0x7F, 2
    if length == 126:
        if len(buf) < 4:
            return None
        length, pos = int.from_bytes(buf[2:4], "big"), 4
    elif length == 127:
        if len(buf) < 10:
            return None
        length, pos = int.from_bytes(buf[2:10], "big"), 10
    mask = None
    if buf[1] & 0x80:
        if len(buf) < pos + 4:
            return None
        mask, pos = bytes(buf[pos:pos + 4]), pos + 4
    if len(buf) < pos + length:
        return None
    payload = bytes(buf[pos:pos + length])
    del buf[:pos + length]
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return opcode, payload


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest rank: a value that was actually observed."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class Fleet:
    """Idle WebSockets to one TLS listener, and what happened to each."""

    def __init__(self, host: str, port: int, server_name: str, origin: str, path: str = "/") -> None:
        self.addr = (host, port)
        self.server_name = server_name
        self.request_head = (f"GET {path} HTTP/1.1\r\nHost: {server_name}:{port}\r\nUpgrade: websocket\r\n"
                             f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n")
        # The bench certificate is self-signed: nothing to verify it against.
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE
        # Without ALPN an h2-capable listener still speaks HTTP/1.1; saying so
        # keeps the test independent of the server's choice.
        self.ctx.set_alpn_protocols(["http/1.1"])
        self.sel = selectors.DefaultSelector()
        self.clients: dict[int, Client] = {}
        self.failures: collections.Counter[str] = collections.Counter()
        # Set when the signal is sent: every time below is relative to it.
        self.t0: float | None = None
        self.closes: list[tuple[float, int]] = []  # (seconds after t0, code)
        # How each connection ended: "after_close" (our Close answered a
        # server Close, then the server closed TCP) or "without_close".
        self.ends: collections.Counter[str] = collections.Counter()
        self.last_end: float | None = None
        self.before_signal: collections.Counter[str] = collections.Counter()
        self.pings = 0
        self.longest_batch = 0.0
        self.exited_at: float | None = None
        self.exit_status: int | None = None
        self.exit_rusage: resource.struct_rusage | None = None
        self._watched_pid: int | None = None

    # ----------------------------------------------------------------- opening

    def count(self, *states: int) -> int:
        return sum(1 for c in self.clients.values() if c.state in states)

    def open(self, count: int, in_flight: int, deadline_s: float) -> float:
        """Opens `count` WebSockets, at most `in_flight` being set up at once
        (more would only pile up in the listener's accept queue and time out
        together); returns the seconds it took. Connections not open by the
        deadline count as failures."""
        started = time.monotonic()
        deadline = started + deadline_s
        begun = 0
        while time.monotonic() < deadline:
            pending = self.count(CONNECTING, TLS, UPGRADING)
            while pending < in_flight and begun < count:
                begun += 1
                pending += self._start()
            if not pending and begun >= count:
                break
            self.pump(0.05)
        for client in [c for c in self.clients.values() if c.state < OPEN]:
            self._fail(client, "not open by the deadline")
        if begun < count:
            self.failures["not started by the deadline"] += count - begun
        return time.monotonic() - started

    def _start(self) -> int:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        result = sock.connect_ex(self.addr)
        if result not in (0, errno.EINPROGRESS):
            sock.close()
            self.failures[f"connect: {errno.errorcode.get(result, result)}"] += 1
            return 0
        client = Client(sock)
        self.clients[client.fd] = client
        self._want(client, selectors.EVENT_WRITE)
        return 1

    # ------------------------------------------------------------------ events

    def pump(self, timeout: float) -> None:
        ready = self.sel.select(timeout)
        batch_start = time.monotonic()
        for key, mask in ready:
            if key.data is _EXIT:
                self._reap()
            else:
                self._on_event(key.data, mask)
        if self.t0 is not None:
            self.longest_batch = max(self.longest_batch, time.monotonic() - batch_start)

    def _want(self, client: Client, events: int) -> None:
        if events == client.events:
            return
        if client.events:
            self.sel.modify(client.fd, events, client)
        else:
            self.sel.register(client.fd, events, client)
        client.events = events

    def _on_event(self, client: Client, mask: int) -> None:
        if client.state == CONNECTING:
            error = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if error:
                return self._fail(client, f"connect: {errno.errorcode.get(error, error)}")
            # The SSL socket takes over the same descriptor, so the selector
            # registration (by descriptor) stays valid.
            client.sock = self.ctx.wrap_socket(client.sock, server_hostname=self.server_name,
                                               do_handshake_on_connect=False)
            client.state = TLS
        if client.state == TLS:
            return self._handshake(client)
        if mask & selectors.EVENT_WRITE and client.wbuf:
            if not self._flush(client):
                return
        if mask & selectors.EVENT_READ:
            self._read(client)

    def _handshake(self, client: Client) -> None:
        try:
            client.sock.do_handshake()
        except ssl.SSLWantReadError:
            return self._want(client, selectors.EVENT_READ)
        except ssl.SSLWantWriteError:
            return self._want(client, selectors.EVENT_WRITE)
        except (ssl.SSLError, OSError) as error:
            return self._fail(client, f"TLS: {type(error).__name__}")
        client.key = base64.b64encode(os.urandom(16))
        client.wbuf += (self.request_head + f"Sec-WebSocket-Key: {client.key.decode()}\r\n\r\n").encode()
        client.state = UPGRADING
        if self._flush(client):
            self._read(client)

    def _flush(self, client: Client) -> bool:
        """Sends what it can; False when the connection ended meanwhile."""
        while client.wbuf:
            try:
                sent = client.sock.send(client.wbuf)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                break
            except (ssl.SSLError, OSError):
                self._ended(client)
                return False
            del client.wbuf[:sent]
        self._want(client, selectors.EVENT_READ | (selectors.EVENT_WRITE if client.wbuf else 0))
        return True

    def _read(self, client: Client) -> None:
        eof = False
        while True:
            try:
                data = client.sock.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                break
            except (ssl.SSLError, OSError):
                eof = True  # a reset, or TLS cut short: an end all the same
                break
            if not data:
                eof = True
                break
            client.rbuf += data
        if client.state == UPGRADING and not self._upgraded(client):
            if eof and client.fd in self.clients:
                self._fail(client, "upgrade: closed before the response")
            return
        while client.state >= OPEN:
            frame = next_frame(client.rbuf)
            if frame is None:
                break
            self._on_frame(client, *frame)
        if client.wbuf and not self._flush(client):
            return
        if eof:
            self._ended(client)

    def _upgraded(self, client: Client) -> bool:
        end = client.rbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(client.rbuf) > 16384:
                self._fail(client, "upgrade: response head too long")
            return False
        head = bytes(client.rbuf[:end]).decode("latin-1")
        del client.rbuf[:end + 4]
        lines = head.split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail(client, f"upgrade: {lines[0][:60]}")
            return False
        expected = base64.b64encode(hashlib.sha1(client.key + WS_GUID).digest()).decode()
        accept = next((line.split(":", 1)[1].strip() for line in lines[1:]
                       if line.lower().startswith("sec-websocket-accept:")), None)
        if accept != expected:
            self._fail(client, "upgrade: wrong Sec-WebSocket-Accept")
            return False
        client.state = OPEN
        return True

    def _on_frame(self, client: Client, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            client.pings += 1
            self.pings += 1
            if client.state == OPEN:
                client.wbuf += masked_frame(OP_PONG, payload)
        elif opcode == OP_CLOSE and client.state == OPEN:
            now = time.monotonic()
            code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            client.code = code
            client.state = CLOSING
            # Echo the code, as browsers do; a Close without one is answered
            # without one (1005 must never be sent).
            client.wbuf += masked_frame(OP_CLOSE, payload[:2] if code != 1005 else b"")
            if self.t0 is None:
                self.before_signal[f"Close {code}"] += 1
            else:
                client.close_at = now - self.t0
                self.closes.append((client.close_at, code))

    def _ended(self, client: Client) -> None:
        if client.fd not in self.clients:
            return
        if client.state < OPEN:
            return self._fail(client, "closed during the upgrade")
        now = time.monotonic()
        if self.t0 is None:
            self.before_signal["closed" if client.state == CLOSING else "dropped without a Close"] += 1
        else:
            self.ends["after_close" if client.state == CLOSING else "without_close"] += 1
            self.last_end = now - self.t0
        self._forget(client)

    def _fail(self, client: Client, reason: str) -> None:
        self.failures[reason] += 1
        self._forget(client)

    def _forget(self, client: Client) -> None:
        if client.events:
            self.sel.unregister(client.fd)
        client.sock.close()
        del self.clients[client.fd]

    # ------------------------------------------------------------------ drain

    def settle(self, seconds: float) -> None:
        """Keeps answering (Pings, say) without doing anything else."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            self.pump(min(left, 0.1))

    def drain(self, pid: int, sig: int, timeout: float) -> None:
        """Sends `sig` to `pid` (a child of this process) and follows every
        connection until it has ended and the process has exited, or for
        `timeout` seconds."""
        pidfd = os.pidfd_open(pid)
        self._watched_pid = pid
        self.sel.register(pidfd, selectors.EVENT_READ, _EXIT)
        self.t0 = time.monotonic()
        os.kill(pid, sig)
        try:
            while (self.clients or self.exited_at is None) and time.monotonic() - self.t0 < timeout:
                self.pump(0.05)
        finally:
            if self.exited_at is None:
                self.sel.unregister(pidfd)
            os.close(pidfd)

    def _reap(self) -> None:
        """Records the exit: the process's own rusage comes with its status
        (the caller must not wait for it again)."""
        self.exited_at = time.monotonic() - self.t0
        for key in list(self.sel.get_map().values()):
            if key.data is _EXIT:
                self.sel.unregister(key.fd)
        _, status, usage = os.wait4(self._watched_pid, 0)
        self.exit_status = os.waitstatus_to_exitcode(status)
        self.exit_rusage = usage

    def close_all(self) -> None:
        for client in list(self.clients.values()):
            self._forget(client)
        self.sel.close()

    def summary(self) -> dict:
        times = sorted(t for t, _ in self.closes)
        codes = collections.Counter(code for _, code in self.closes)
        last = times[-1] if times else None
        return {
            "close_frames": len(times),
            "close_codes": {str(code): n for code, n in sorted(codes.items())},
            "first_close_s": times[0] if times else None,
            "close_p10_s": percentile(times, 0.10),
            "close_p50_s": percentile(times, 0.50),
            "close_p90_s": percentile(times, 0.90),
            "last_close_s": last,
            "ended_after_close": self.ends["after_close"],
            "ended_without_close": self.ends["without_close"],
            "still_open_at_timeout": len(self.clients),
            "last_tcp_close_s": self.last_end,
            "exit_s": self.exited_at,
            "exit_after_last_close_s": (self.exited_at - last) if (self.exited_at is not None and last is not None)
                                       else None,
            "exit_status": self.exit_status,
            "pings_answered": self.pings,
            "ended_before_signal": dict(self.before_signal),
            "client_longest_batch_ms": self.longest_batch * 1e3,
            # Sorted arrival times, 1 ms resolution: the whole spread, for plots.
            "close_times_s": [round(t, 3) for t in times],
        }
