#!/usr/bin/env python3
"""Side-by-side benchmark of wsgate against nginx and HAProxy (issue 4).

    python3 benches/compare.py              # full run: 3 interleaved rounds + 3 drains, ~15 min
    python3 benches/compare.py --quick      # smoke test: 1 round, short runs, ~2.5 min
    python3 benches/compare.py --rounds 5 --duration 8 --hold 1000,9800
    python3 benches/compare.py --workloads plain_handshake,echo --targets nginx,wsgate
    python3 benches/compare.py --quick --workloads drain --drain-tunnels 300
    python3 benches/compare.py --h2 --rounds 5   # the HTTP/2 rows (below), ~12 min

What it does, in order:

1. `cargo build --release` (skip with --no-build), and `apt-get install nginx
   haproxy` when either is missing.
2. One ECDSA P-256 certificate from `wsgate cert`, shared by every proxy.
3. Starts the echo backend (`wsgate echo`) and nginx, HAProxy and wsgate with
   equivalent configs: TLS 1.2+1.3 with that certificate, upgrade forwarding,
   X-Forwarded-For/Proto/Host and X-Real-IP, 1 h tunnel timeouts, no access
   logs, one worker process / one thread. The proxies run on CPU 1; the load
   tool (`wsgate load`), the backend and this script on CPU 0. All three
   proxies allow TLS session resumption; `wsgate load` resumes by default,
   and `--no-tls-resume` makes the full-handshake workload's every
   handshake a full one.
4. Runs every workload against nginx, HAProxy, wsgate and the backend directly,
   interleaved (A B C D, then B C D A, ...; the order rotates so no target is
   always first), for --rounds rounds.
5. Drain (workload `drain`, after the others): a fresh wsgate with
   `drain_spread` set holds --drain-tunnels idle TLS WebSockets from this
   script's own clients (benches/wsdrain.py), gets SIGTERM, and each
   connection's Close frame is timed from the signal, with its code, and the
   process's exit after it. Only wsgate sends Close frames on a drain; with
   --drain-peers nginx (SIGQUIT) and HAProxy (SIGUSR1) are drained the same way
   to show what their clients see instead.
6. Prints a markdown table of medians and ratios (wsgate / better peer) and
   the drain table, writes every run and the medians to
   benches/out/results.json and the tables to benches/out/results.md.

Why the figures are what they are: on a 2-core machine the load tool and the
backend saturate CPU 0 long before a good proxy saturates CPU 1, so raw rates
mostly measure the load tool. The proxies are compared by their own CPU time
(utime + stime of all their processes, from /proc) per unit of work, by echo
latency at a fixed moderate rate, and by RSS per idle connection; raw rates
are reported too, with each core's utilisation, so it is visible which side
was the bottleneck.

HTTP/2 rows (--h2, a run of their own): WebSockets over HTTP/2 (RFC 8441,
`wsgate load --h2`) through wsgate and HAProxy (nginx cannot carry them),
each beside the HTTP/1.1 figure of the same run: echo CPU per message; a new
WebSocket as a new stream on an existing connection against a full TLS
handshake + upgrade; RSS per idle WebSocket, 1,000 streams on 10
connections; and plain GETs over h2 from `h2load` (Debian nghttp2-client)
through nginx, HAProxy and wsgate to an nginx that answers 200 (the
WebSocket echo backend speaks no plain HTTP), each proxy keeping its backend
connections alive. nginx and HAProxy get a listener of their own with ALPN
h2,http/1.1; wsgate's TLS listener offers h2 already.

Only loopback addresses are used. Every process this script starts is tracked
by PID and stopped on exit (never by name).
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import wsdrain

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benches" / "out"
BUILT = ROOT / "target" / "release" / "wsgate"
# The binary every run uses: a copy of BUILT taken once at the start (see build()).
WSGATE = BUILT

# The load tool sends this Origin; wsgate's route allows exactly it.
ORIGIN = "https://bench.example"
LOOPBACK = "127.0.0.1"
PROXY_CPU = "1"
CLIENT_CPU = "0"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# This machine's hard open-file limit is 20,000. A proxied connection costs the
# proxy two descriptors (client + upstream), so one proxy process can hold at
# most ~9,980 tunnels; 9,800 leaves room for listeners, logs and the like.
DEFAULT_HOLD = (1000, 9800)
# Idle connections are opened at this pace for every target alike, so that no
# proxy's accept queue overflows into SYN retransmits that would only measure
# the kernel's 1 s retry timer.
HOLD_OPEN_RATE = 1000

# wsgate's routes ping idle clients in every run, so the idle-memory rows
# include the timers and state that liveness checks cost (issue 13's bar is
# per idle WebSocket *with* ping_interval set). nginx and HAProxy have no
# WebSocket pings, so their configs have no counterpart.
PING_INTERVAL = "30s"
# The drain runs' wsgate: long enough that no tunnel is cut while its
# closing handshake is under way, so every end seen is a clean one.
DRAIN_TIMEOUT = "30s"
# TLS connections the drain clients set up at once: more only queue in the
# listener's backlog and share one deadline.
DRAIN_IN_FLIGHT = 200
# With --drain-peers: how long nginx (worker_shutdown_timeout) and HAProxy
# (hard-stop-after) keep tunnels open after their graceful-stop signal.
PEER_DRAIN_LIMIT_S = 10
# --h2: WebSockets per HTTP/2 connection (wsgate load's default; HAProxy's
# stream limit is also 100), and the plain-GET path, routed to an HTTP backend.
H2_STREAMS = 100
GET_PATH = "/get"
# h2load: connections x concurrent streams each, one thread on the client core.
H2LOAD_CONNECTIONS = 10
H2LOAD_STREAMS = 10


# --------------------------------------------------------------------------
# Process bookkeeping


class Registry:
    """Every process we start, so that all of them are stopped on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def spawn(self, argv: list[str], **kwargs) -> subprocess.Popen:
        # A new session makes the process a group leader: stopping its group
        # also stops nginx's worker, without ever looking processes up by name.
        proc = subprocess.Popen(argv, start_new_session=True, preexec_fn=raise_nofile, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        else:
            # The leader is gone; a straggler in its group (nginx worker) may not be.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            try:
                self.stop(proc, grace=5.0)
            except Exception as error:  # cleanup must go on whatever one process does
                print(f"warning: could not stop pid {proc.pid}: {error}", file=sys.stderr)


REGISTRY = Registry()


def raise_nofile() -> None:
    """Runs in each child before exec: soft open-file limit up to the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv] if shutil.which("taskset") else argv


# --------------------------------------------------------------------------
# /proc accounting


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants (this kernel has no /proc/PID/task/*/children)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = read_stat(int(entry))
        if stat is not None:
            parents.setdefault(int(stat[1]), []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        if Path(f"/proc/{pid}").exists():
            tree.append(pid)
            todo.extend(parents.get(pid, []))
    return tree


def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after `comm`, so index 0 is `state` (field 3)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm may hold spaces and parentheses; it ends at the last ')'.
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of whole processes: /proc/PID/stat already sums every
    thread of the process, live or exited, so the tasks are not added again."""
    ticks = 0
    for pid in pids:
        stat = read_stat(pid)
        if stat is not None:
            ticks += int(stat[11]) + int(stat[12])  # fields 14 and 15
    return ticks / CLK_TCK


def status_field(pid: int, name: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def rss_kib(pids: list[int]) -> int:
    return sum(status_field(pid, "VmRSS") for pid in pids)


def socket_fds(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        count += 1
                except OSError:
                    pass  # closed while we looked
        except (FileNotFoundError, ProcessLookupError):
            pass
    return count


def cpu_busy_seconds() -> dict[str, float]:
    """Busy time of each CPU from /proc/stat (everything but idle and iowait).
    The machine is shared: busy time not explained by our processes is other
    people's work competing with the benchmark, recorded as noise."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *fields = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
            busy[name] = (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK
    return busy


def children_cpu_seconds() -> float:
    """CPU of every reaped child so far: the delta around one load run is the
    load tool's own CPU, since nothing else is reaped meanwhile."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------
# Targets


def free_ports(count: int) -> list[int]:
    """Distinct free loopback ports; all held open until all are chosen."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_ports(proc: subprocess.Popen, ports: list[int], log: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening; see {log}:\n{tail(log)}")
        try:
            with socket.create_connection((LOOPBACK, pending[0]), timeout=1):
                pending.pop(0)
                continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"port {pending[0]} not listening after {timeout}s; see {log}:\n{tail(log)}")
        time.sleep(0.05)


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


@dataclass
class Server:
    """A long-running process we measure: a proxy, or the echo backend."""

    name: str
    argv: list[str]
    ports: list[int]
    cpu: str
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0

    def start(self) -> None:
        self.starts += 1
        log = self.log_path()
        with open(log, "ab") as out:
            self.proc = REGISTRY.spawn(
                pinned(self.cpu, self.argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                env={**os.environ, **self.env},
            )
        wait_for_ports(self.proc, self.ports, log)

    def stop(self) -> None:
        if self.proc is not None:
            REGISTRY.stop(self.proc)
            self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def pids(self) -> list[int]:
        assert self.proc is not None, f"{self.name} is not running"
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} died (exit {self.proc.returncode}); see {self.log_path()}:\n{tail(self.log_path())}")
        return process_tree(self.proc.pid)


@dataclass
class Target:
    """Something the load tool connects to: a proxy, or the backend directly."""

    name: str
    label: str
    server: Server  # the process whose CPU and memory are measured
    is_proxy: bool
    # scheme://host:port per kind of listener: "tls" and "plain".
    urls: dict[str, str]


# --------------------------------------------------------------------------
# Configs: equivalent settings for each proxy


def nginx_conf(work: Path, tls: int, plain: int, backend: int, cert: Path, key: Path,
               name: str = "nginx", main_extra: str = "", h2: int | None = None,
               http_backend: int | None = None) -> str:
    temp = work / "nginx-temp"
    temp.mkdir(exist_ok=True)
    h2_server = ""
    if h2 is not None and http_backend is not None:
        # Plain GETs over h2 (nginx 1.22 has no RFC 8441), to the HTTP backend
        # over kept-alive HTTP/1.1 connections as HAProxy and wsgate keep them.
        h2_server = f"""
    upstream http_backend {{
        server {LOOPBACK}:{http_backend};
        # Above h2load's 100 requests in flight, as wsgate's and HAProxy's
        # pools are: a smaller cache closes and reopens connections each burst.
        keepalive 256;
    }}

    server {{
        listen {LOOPBACK}:{h2} ssl http2;
        # Its default of 1,000 requests per client connection would end
        # h2load's connections mid-run (h2load does not reconnect).
        keepalive_requests 100000000;
        keepalive_timeout 1h;
        location / {{
            proxy_pass http://http_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Real-IP $remote_addr;
        }}
    }}
"""
    return f"""# Generated by benches/compare.py.
worker_processes 1;
worker_rlimit_nofile 20000;
pid {work}/{name}.pid;
error_log {work}/{name}-error.log warn;
daemon off;
{main_extra}

events {{
    # nginx starts closing connections still waiting for a request (our
    # connecting clients) once fewer than 1/16 of worker_connections are
    # free, so 9,800 tunnels (19,600 connections) need more than 20,000 slots
    # even though the open-file limit is 20,000 (it only warns about that).
    worker_connections 24000;
}}

http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;

    ssl_certificate {cert};
    ssl_certificate_key {key};
    # Debian's nginx 1.22 negotiates TLS 1.2 unless told otherwise.
    ssl_protocols TLSv1.2 TLSv1.3;
    # Session resumption on, as wsgate (rustls) always has it.
    ssl_session_cache shared:bench:10m;
    ssl_session_tickets on;

    upstream echo_backend {{
        server {LOOPBACK}:{backend};
    }}

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    server {{
        listen {LOOPBACK}:{tls} ssl;
        listen {LOOPBACK}:{plain};
        location / {{
            proxy_pass http://echo_backend;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            proxy_set_header X-Forwarded-Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
{h2_server}}}
"""


def haproxy_cfg(tls: int, plain: int, backend: int, pem: Path, global_extra: str = "",
                h2: int | None = None, http_backend: int | None = None) -> str:
    h2_frontend = ""
    if h2 is not None and http_backend is not None:
        # RFC 8441 WebSockets (HAProxy turns them into HTTP/1.1 upgrades to the
        # backend) and plain GETs, on a listener that offers h2.
        h2_frontend = f"""
frontend bench_h2
    bind {LOOPBACK}:{h2} ssl crt {pem} alpn h2,http/1.1
    http-request set-header X-Forwarded-Proto https
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Real-IP %[src]
    use_backend http_backend if {{ path_beg {GET_PATH} }}
    default_backend echo_backend

backend http_backend
    server http {LOOPBACK}:{http_backend}
"""
    return f"""# Generated by benches/compare.py.
global
    nbthread 1
    {global_extra}
    # Two descriptors per tunnel under the 20,000 hard limit.
    maxconn 9950
    ssl-default-bind-options ssl-min-ver TLSv1.2
    # Session cache and tickets stay at their defaults (resumption on, as in
    # wsgate). No logs: HAProxy logs nothing without a `log` line.

defaults
    mode http
    maxconn 9950
    option forwardfor
    timeout connect 5s
    timeout http-request 10s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h

frontend bench
    bind {LOOPBACK}:{tls} ssl crt {pem} alpn http/1.1
    bind {LOOPBACK}:{plain}
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    http-request set-header X-Forwarded-Proto http if !{{ ssl_fc }}
    http-request set-header X-Forwarded-Host %[req.hdr(host)]
    http-request set-header X-Real-IP %[src]
    default_backend echo_backend

backend echo_backend
    server echo {LOOPBACK}:{backend}
{h2_frontend}"""


def wsgate_toml(tls: int, plain: int, backend: int, cert: Path, key: Path, pings: bool = True,
                drain_spread: str | None = None, http_backend: int | None = None) -> str:
    if drain_spread is None:
        # Restarts between memory runs should not wait out the default 30 s drain.
        drain = 'drain_timeout = "1s"'
    else:
        drain = f'drain_timeout = "{DRAIN_TIMEOUT}"\ndrain_spread = "{drain_spread}"'
    ping = f'ping_interval = "{PING_INTERVAL}"' if pings else ""
    get_route = "" if http_backend is None else f"""
# --h2: plain GETs to an HTTP backend (the echo backend speaks only WebSocket).
[upstream.http]
servers = ["{LOOPBACK}:{http_backend}"]

[[route]]
path = "{GET_PATH}"
upstream = "http"
websocket = "forbidden"
"""
    return f"""# Generated by benches/compare.py.
[[listener]]
addr = "{LOOPBACK}:{tls}"
tls = {{ certs = [ {{ cert = "{cert}", key = "{key}" }} ] }}

[[listener]]
addr = "{LOOPBACK}:{plain}"

[server]
# As nginx's $proxy_add_x_forwarded_for: a loopback peer's chain is extended.
trusted_proxies = ["127.0.0.1/32", "::1/128"]
max_connections = 20000
{drain}
# One thread, as nginx runs one worker and HAProxy one thread here.
worker_threads = 1

[upstream.echo]
servers = ["{LOOPBACK}:{backend}"]

[[route]]
path = "/"
upstream = "echo"
websocket = "allowed"
origins = ["{ORIGIN}"]
missing_origin = "allow"
idle_timeout = "1h"
{ping}
{get_route}"""


def http_backend_conf(work: Path, port: int) -> str:
    """nginx as the HTTP backend of the plain-GET rows: a 200 with a short body."""
    temp = work / "nginx-temp"
    temp.mkdir(exist_ok=True)
    return f"""# Generated by benches/compare.py.
worker_processes 1;
pid {work}/http-backend.pid;
error_log {work}/http-backend-error.log warn;
daemon off;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    client_body_temp_path {temp}/backend-body;
    proxy_temp_path {temp}/backend-proxy;
    fastcgi_temp_path {temp}/backend-fastcgi;
    uwsgi_temp_path {temp}/backend-uwsgi;
    scgi_temp_path {temp}/backend-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 1h;

    server {{
        listen {LOOPBACK}:{port};
        location / {{
            default_type text/plain;
            return 200 "hello from the backend";
        }}
    }}
}}
"""


def write_wsgate_config(binary: Path, path: Path, make: Callable[[bool], str], pings_optional: bool) -> str:
    """Writes the config `binary check` accepts, with ping_interval if it
    can: a --baseline older than the key must still run, without pings, so
    its rows then measure it as it could be deployed. Returns what was written."""
    problems = ""
    for pings in ((True, False) if pings_optional else (True,)):
        path.write_text(make(pings))
        done = subprocess.run([str(binary), "check", "-c", str(path)], capture_output=True, text=True, timeout=30)
        if done.returncode == 0:
            return f'ping_interval = "{PING_INTERVAL}"' if pings else \
                "no ping_interval (this binary's `check` refuses the key)"
        problems = (done.stdout + done.stderr).strip()
        if "ping_interval" not in problems:
            break  # refused for another reason: dropping pings would not help
    sys.exit(f"{binary} check refuses {path}:\n{problems}")


# --------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    key: str
    title: str
    listener: str  # which URL of the target: "tls" or "plain"
    args: Callable[[argparse.Namespace], list[str]]
    # How much work a run did, from the load tool's report; CPU is divided by it.
    units: Callable[[dict], float]
    unit_name: str
    cpu_scale: float  # seconds -> the unit the figure is quoted in
    cpu_label: str
    rate: Callable[[dict], float]
    rate_label: str
    hold: int = 0  # > 0: an idle-memory run holding this many connections
    with_direct: bool = True
    # The targets that can run it (None = all): nginx has no RFC 8441.
    only: tuple[str, ...] | None = None
    # "load" = `wsgate load`; "h2load" = nghttp2's h2load for plain GETs.
    driver: str = "load"
    # Hold over h2: the client's TCP connections, fewer than the WebSockets.
    h2_clients: int = 0


def handshakes(report: dict) -> float:
    return report["handshakes"]["succeeded"]


def messages_received(report: dict) -> float:
    return report["messages"]["received"]


def megabytes_both_ways(report: dict) -> float:
    return (report["messages"]["bytes_sent"] + report["messages"]["bytes_received"]) / 1e6


def requests_succeeded(report: dict) -> float:
    return report["requests"]["succeeded_2xx"]


H2_SET = ("echo", "h2_echo", "tls_handshake_full", "h2_stream", "hold_1000", "h2_hold_1000", "h2_get")
RFC8441_PEERS = ("haproxy", "wsgate", "before")


def h2_workloads(opts: argparse.Namespace) -> list[Workload]:
    dur = f"{opts.duration}s"
    forever = "1000000000"
    h2 = ["--h2", "--streams-per-connection", str(H2_STREAMS)]
    hold_count, hold_conns = 1000, 10
    hold_secs = hold_count / HOLD_OPEN_RATE + 4
    return [
        # As `echo`, 64 WebSockets x 128 B, but as streams of one TLS connection.
        Workload("h2_echo", "echo 64 streams x 128 B over h2 (1 TLS connection)", "h2",
                 lambda o: [*h2, "--mode", "echo", "--connections", "64", "--messages", forever,
                            "--message-size", "128", "--duration", dur],
                 messages_received, "message", 1e6, "proxy CPU µs per echoed 128 B message over h2 (RFC 8441)",
                 lambda r: r["messages"]["received_per_sec"], "echo messages/s over h2 (64 streams x 128 B)",
                 with_direct=False, only=RFC8441_PEERS),
        # A new WebSocket = a new extended CONNECT stream on a connection that
        # is already up: no TCP, no TLS, only the request and the upgrade
        # toward the backend. Compared with tls_handshake_full.
        Workload("h2_stream", "new WebSocket as a new h2 stream (existing connection)", "h2",
                 lambda o: [*h2, "--mode", "handshake", "--connections", "32", "--duration", dur],
                 handshakes, "handshake", 1e6, "proxy CPU µs per new WebSocket on an existing h2 connection",
                 lambda r: r["handshakes"]["succeeded_per_sec"], "new WebSockets/s on existing h2 connections",
                 with_direct=False, only=RFC8441_PEERS),
        Workload(f"h2_hold_{hold_count}", f"{hold_count} idle WebSockets over h2 ({hold_conns} connections)", "h2",
                 lambda o: ["--h2", "--streams-per-connection", str(hold_count // hold_conns), "--mode", "hold",
                            "--connections", str(hold_count), "--rate", str(HOLD_OPEN_RATE), "--timeout", "30s",
                            "--duration", f"{hold_secs:.1f}s"],
                 handshakes, "connection", 1e6, "proxy CPU µs per held h2 WebSocket (open + hold + close)",
                 lambda r: r["peak_open_connections"], "peak open WebSockets over h2", hold=hold_count,
                 with_direct=False, only=RFC8441_PEERS, h2_clients=hold_conns),
        Workload("h2_get", "plain GET over h2 (h2load)", "h2",
                 lambda o: [], requests_succeeded, "request", 1e6, "proxy CPU µs per plain GET over h2 (h2load)",
                 lambda r: r["requests"]["per_sec"],
                 f"GET requests/s over h2 (h2load, {H2LOAD_CONNECTIONS} conns x {H2LOAD_STREAMS} streams)",
                 with_direct=False, driver="h2load"),
    ]


def workloads(opts: argparse.Namespace) -> list[Workload]:
    dur = f"{opts.duration}s"
    # A huge per-connection message count: each connection echoes until the
    # deadline instead of reconnecting, so echo and bulk measure the tunnel.
    forever = "1000000000"
    handshake = ["--mode", "handshake", "--connections", "32", "--duration", dur]
    # Open loop at a fixed 5,000 msg/s: 50 connections stay open for the run,
    # each sending 100 msg/s on its own timetable, the timetables staggered so
    # sends are spread evenly, at most one echo outstanding per connection
    # (--in-flight 1). Round trips are timed from each message's scheduled send
    # time whenever the tunnel held the send back, so a stall is not hidden by
    # the sends it delayed (coordinated omission); the load tool's own timer
    # lateness is not charged. The same for every target.
    paced = ["--mode", "echo", "--connections", "50", "--message-rate", "5000", "--messages", forever,
             "--message-size", "128", "--duration", dur]
    found = [
        # `wsgate load` keeps rustls' client session cache, so against a
        # server that resumes (all three do) ~95 % of its handshakes are TLS
        # 1.3 resumptions: no certificate, no signature.
        Workload("tls_handshake", "TLS handshake + upgrade (wsgate load, resumed)", "tls",
                 lambda o: handshake, handshakes, "handshake", 1e6,
                 "proxy CPU µs per TLS handshake + upgrade, as `wsgate load` makes them (~95 % resumed)",
                 lambda r: r["handshakes"]["succeeded_per_sec"], "TLS handshakes/s (wsgate load, resumed)"),
        # The figure is per *full* handshake: `wsgate load
        # --no-tls-resume` makes every handshake a full one (no session
        # cache), from a client fast enough to keep each proxy busy, so the
        # figure is not dominated by fixed costs of a mostly idle proxy (as it
        # was with a Python client saturating its own core at ~1,000/s).
        Workload("tls_handshake_full", "full TLS handshake + upgrade (wsgate load --no-tls-resume)", "tls",
                 lambda o: handshake + ["--no-tls-resume"], handshakes, "handshake", 1e6,
                 "proxy CPU µs per full TLS handshake + upgrade",
                 lambda r: r["handshakes"]["succeeded_per_sec"], "full TLS handshakes/s (no resumption)",
                 with_direct=False),
        Workload("plain_handshake", "plaintext handshake + upgrade", "plain",
                 lambda o: handshake, handshakes, "handshake", 1e6, "proxy CPU µs per plaintext handshake + upgrade",
                 lambda r: r["handshakes"]["succeeded_per_sec"], "plaintext handshakes/s"),
        Workload("echo", "echo 64 conns x 128 B, TLS", "tls",
                 lambda o: ["--mode", "echo", "--connections", "64", "--messages", forever,
                            "--message-size", "128", "--duration", dur],
                 messages_received, "message", 1e6, "proxy CPU µs per echoed 128 B message (TLS)",
                 lambda r: r["messages"]["received_per_sec"], "echo messages/s (64 conns x 128 B, TLS)"),
        Workload("echo_paced", "echo at ~5,000 msg/s, TLS", "tls",
                 lambda o: paced, messages_received, "message", 1e6,
                 "proxy CPU µs per echoed message at ~5,000 msg/s (TLS)",
                 lambda r: r["messages"]["received_per_sec"], "achieved msg/s in the paced run"),
        Workload("bulk", "bulk 64 KiB messages, TLS", "tls",
                 lambda o: ["--mode", "bulk", "--connections", "4", "--in-flight", "4", "--messages", forever,
                            "--message-size", "65536", "--duration", dur],
                 megabytes_both_ways, "MB", 1e3, "proxy CPU ms per MB of bulk (64 KiB msgs, TLS, both ways)",
                 lambda r: megabytes_both_ways(r) / r["elapsed_secs"], "bulk MB/s (both ways)"),
    ]
    for count in opts.hold:
        # Long enough to open them all at the shared pace, plus time to settle.
        hold_secs = count / HOLD_OPEN_RATE + 4
        found.append(
            Workload(f"hold_{count}", f"{count} idle TLS WebSockets", "tls",
                     lambda o, count=count, hold_secs=hold_secs: [
                         "--mode", "hold", "--connections", str(count), "--rate", str(HOLD_OPEN_RATE),
                         "--timeout", "30s", "--duration", f"{hold_secs:.1f}s"],
                     handshakes, "connection", 1e6, "proxy CPU µs per held connection (open + hold + close)",
                     lambda r: r["peak_open_connections"], "peak open connections", hold=count))
    if opts.h2:
        found += h2_workloads(opts)
        # The HTTP/1.1 rows the h2 ones are compared with, from the same run.
        wanted_h2 = set(opts.workloads) if opts.workloads is not None else set(H2_SET)
        found = [w for w in found if w.key in wanted_h2]
        for work in found:
            if work.key in ("echo", "tls_handshake_full", "hold_1000"):
                work.only = RFC8441_PEERS
        return found
    if opts.workloads is not None:
        wanted = set(opts.workloads)
        unknown = wanted - {w.key for w in found}
        if unknown:
            sys.exit(f"unknown workload(s): {', '.join(sorted(unknown))}; "
                     f"known: {', '.join(w.key for w in found)}, drain")
        found = [w for w in found if w.key in wanted]
    return found


# --------------------------------------------------------------------------
# One run


def load_argv(url: str, extra: list[str]) -> list[str]:
    return pinned(CLIENT_CPU, [str(WSGATE), "load", "--url", url, "--json", "--insecure", "--origin", ORIGIN, *extra])


def run_load(url: str, extra: list[str], duration_hint: float) -> tuple[dict | None, str, float, float]:
    """Runs `wsgate load` on the client CPU; returns (report, stderr, client CPU s, wall s)."""
    argv = load_argv(url, extra)
    before = children_cpu_seconds()
    started = time.monotonic()
    proc = REGISTRY.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "RUST_LOG": "warn"})
    try:
        out, err = proc.communicate(timeout=duration_hint + 60)
    except subprocess.TimeoutExpired:
        REGISTRY.stop(proc)
        return None, "load tool timed out", 0.0, time.monotonic() - started
    REGISTRY.procs.remove(proc)
    wall = time.monotonic() - started
    load_cpu = children_cpu_seconds() - before
    try:
        return json.loads(out), err.decode(errors="replace"), load_cpu, wall
    except json.JSONDecodeError:
        return None, (out + err).decode(errors="replace"), load_cpu, wall


def h2load_cmd(url: str, duration: float) -> list[str]:
    return ["h2load", "-D", f"{duration:g}", "-c", str(H2LOAD_CONNECTIONS), "-m", str(H2LOAD_STREAMS), "-t", "1", url]


def h2load_argv(url: str, duration: float) -> list[str]:
    return pinned(CLIENT_CPU, h2load_cmd(url, duration))


def parse_h2load(text: str) -> dict | None:
    """h2load's summary as a report like `wsgate load`'s, for run_one."""
    finished = re.search(r"finished in ([\d.]+)s, ([\d.]+) req/s", text)
    requests = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                         r"(\d+) errored, (\d+) timeout", text)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", text)
    if not (finished and requests and codes):
        return None
    done, succeeded, failed, errored, timeout = (int(requests.group(i)) for i in (3, 4, 5, 6, 7))
    ok = int(codes.group(1))
    return {
        "elapsed_secs": float(finished.group(1)),
        "requests": {"done": done, "succeeded": succeeded, "succeeded_2xx": ok,
                     "per_sec": ok / float(finished.group(1)) if float(finished.group(1)) else 0.0},
        # run_one counts these as failures: anything but a 2xx.
        "handshakes": {"failed": failed + errored + timeout + (succeeded - ok)},
        "errors": {},
    }


def run_h2load(url: str, duration: float) -> tuple[dict | None, str, float, float]:
    """Runs h2load on the client CPU; returns (report, output, client CPU s, wall s)."""
    before = children_cpu_seconds()
    started = time.monotonic()
    proc = REGISTRY.spawn(h2load_argv(url, duration), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        REGISTRY.stop(proc)
        return None, "h2load timed out", 0.0, time.monotonic() - started
    REGISTRY.procs.remove(proc)
    text = out.decode(errors="replace")
    return parse_h2load(text), text, children_cpu_seconds() - before, time.monotonic() - started


def run_one(target: Target, workload: Workload, opts: argparse.Namespace, backend: Server, round_no: int) -> dict:
    server = target.server
    url = target.urls["plain" if target.name == "direct" else workload.listener]
    extra = workload.args(opts)
    if workload.driver == "h2load":
        url = url.replace("wss://", "https://").rstrip("/") + GET_PATH
        extra = h2load_cmd(url, opts.duration)
    record: dict = {"round": round_no, "target": target.name, "workload": workload.key, "url": url, "args": extra}

    if workload.hold and target.is_proxy:
        # A fresh process: freed memory kept by the allocator from earlier
        # runs would otherwise absorb the new connections and flatter the figure.
        server.restart()
        time.sleep(0.5)
    pids = server.pids()
    base_rss = rss_kib(pids)
    base_socks = socket_fds(pids)
    proxy_cpu0 = cpu_seconds(pids)
    backend_cpu0 = cpu_seconds(backend.pids())
    machine0 = cpu_busy_seconds()

    if workload.hold:
        report, err, load_cpu, wall, held = hold_run(server, url, extra, workload.hold, target.is_proxy, base_socks,
                                                     workload.h2_clients)
        record.update(held)
        if held.get("held_connections"):
            record["rss_base_kib"] = base_rss
            record["kib_per_connection"] = (held["rss_held_kib"] - base_rss) / held["held_connections"]
    elif workload.driver == "h2load":
        report, err, load_cpu, wall = run_h2load(url, opts.duration)
    else:
        report, err, load_cpu, wall = run_load(url, extra, opts.duration)

    pids = server.pids()
    proxy_cpu = cpu_seconds(pids) - proxy_cpu0
    backend_cpu = cpu_seconds(backend.pids()) - backend_cpu0
    machine = {cpu: busy - machine0.get(cpu, 0.0) for cpu, busy in cpu_busy_seconds().items()}
    # Busy CPU time on the whole machine that none of our processes used.
    ours = load_cpu + backend_cpu + (cpu_seconds(pids) - proxy_cpu0 if target.is_proxy else 0.0)
    foreign = max(0.0, sum(machine.values()) - ours)
    record.update({"wall_s": wall, "load_cpu_s": load_cpu, "backend_cpu_s": backend_cpu,
                   "threads": sum(status_field(pid, "Threads") for pid in pids), "processes": len(pids)})
    if report is None:
        record["error"] = err.strip()[-2000:]
        return record
    elapsed = report["elapsed_secs"]
    units = workload.units(report)
    record.update({
        "report": report,
        "units": units,
        "rate": workload.rate(report),
        "failures": report["handshakes"]["failed"] + sum(report["errors"].values()),
        # Busy share of each core over the load tool's run: which side was the bottleneck.
        "client_core_busy": (load_cpu + backend_cpu) / elapsed if elapsed else None,
        "load_cpu_share": load_cpu / elapsed if elapsed else None,
        # In cores: 1.0 = someone else kept a whole core busy during the run.
        "foreign_cores": foreign / wall if wall else None,
    })
    if target.is_proxy:
        record["proxy_cpu_s"] = proxy_cpu
        record["proxy_core_busy"] = proxy_cpu / elapsed if elapsed else None
        if units:
            record["cpu_per_unit"] = proxy_cpu / units * workload.cpu_scale
    if report.get("echo_rtt_ms"):
        record["rtt_p50_ms"] = report["echo_rtt_ms"]["p50"]
        record["rtt_p99_ms"] = report["echo_rtt_ms"]["p99"]
    if report.get("handshake_latency_ms"):
        record["handshake_p99_ms"] = report["handshake_latency_ms"]["p99"]
    if record["failures"]:
        record["stderr"] = err.strip()[-2000:]
    return record


def hold_run(server: Server, url: str, extra: list[str], count: int, is_proxy: bool, base_socks: int,
             h2_clients: int = 0):
    """Starts the load tool holding `count` connections and samples the
    server's RSS once they are all established (or just before the end).
    Over h2 (`h2_clients` > 0) the proxy has that many client sockets and one
    backend socket per WebSocket."""
    duration = float(extra[extra.index("--duration") + 1].rstrip("s"))
    argv = load_argv(url, extra)
    before = children_cpu_seconds()
    started = time.monotonic()
    proc = REGISTRY.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env={**os.environ, "RUST_LOG": "warn"})
    # A proxied connection is two sockets in the proxy, a direct one is one.
    per_conn = 2 if is_proxy else 1
    want = base_socks + per_conn * count
    if h2_clients:
        want = base_socks + count + h2_clients
    held: dict = {}
    # Sample at the latest 1.5 s before the load tool starts closing.
    last_chance = started + duration - 1.5
    while True:
        time.sleep(0.25)
        socks = socket_fds(server.pids())
        now = time.monotonic()
        if socks >= want or now >= last_chance or proc.poll() is not None:
            if socks >= want and now + 1 < last_chance:
                time.sleep(1)  # let handshake-time buffers be released first
            pids = server.pids()
            socks = socket_fds(pids)
            held_count = max(0, socks - base_socks - h2_clients) if h2_clients else \
                max(0, (socks - base_socks) // per_conn)
            held = {"rss_held_kib": rss_kib(pids),
                    "held_connections": held_count,
                    "all_established": socks >= want}
            break
    try:
        out, err = proc.communicate(timeout=duration + 60)
    except subprocess.TimeoutExpired:
        REGISTRY.stop(proc)
        return None, "load tool timed out", 0.0, time.monotonic() - started, held
    REGISTRY.procs.remove(proc)
    wall = time.monotonic() - started
    load_cpu = children_cpu_seconds() - before
    try:
        report = json.loads(out)
    except json.JSONDecodeError:
        return None, (out + err).decode(errors="replace"), load_cpu, wall, held
    return report, err.decode(errors="replace"), load_cpu, wall, held


# --------------------------------------------------------------------------
# Drain


@dataclass
class DrainSubject:
    """A proxy drained with its own graceful-stop signal."""

    name: str
    server: Server  # started fresh for each run: the signal ends it
    port: int  # its TLS listener
    sig: signal.Signals
    timeout: float  # seconds to follow it after the signal


def duration_secs(text: str) -> float:
    """The subset of wsgate's duration syntax the drain flags need ("5s", "500ms", "1m 30s")."""
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0}
    parts = re.findall(r"(\d+)\s*(ms|min|s|m)", text)
    if not parts or re.sub(r"(\d+)\s*(ms|min|s|m)|\s", "", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 5s or 500ms")
    return sum(int(n) * units[unit] for n, unit in parts)


def drain_run(subject: DrainSubject, opts: argparse.Namespace, run_no: int) -> dict:
    """Opens the idle WebSockets, sends the signal, and follows every
    connection to its end and the process to its exit."""
    server = subject.server
    record: dict = {"run": run_no, "target": subject.name, "signal": subject.sig.name,
                    "tunnels": opts.drain_tunnels, "drain_spread": opts.drain_spread}
    fleet = wsdrain.Fleet(LOOPBACK, subject.port, "localhost", ORIGIN)
    try:
        server.start()
        pids = server.pids()
        base_rss, base_socks = rss_kib(pids), socket_fds(pids)
        # Python's TLS handshakes run at ~1,000/s on one core: a generous
        # deadline, which a proxy that stalls still cannot stretch forever.
        record["open_s"] = fleet.open(opts.drain_tunnels, DRAIN_IN_FLIGHT, 60 + opts.drain_tunnels / 100)
        record["opened"] = fleet.count(wsdrain.OPEN)
        record["open_failures"] = dict(fleet.failures)
        # Upgrade-time buffers are released, and a slow backend connection
        # would show up in the socket count.
        fleet.settle(1.0)
        pids = server.pids()
        record["proxy_tunnel_sockets"] = socket_fds(pids) - base_socks
        record["proxy_rss_per_tunnel_kib"] = ((rss_kib(pids) - base_rss) / record["opened"]
                                              if record["opened"] else None)
        proxy_cpu0 = cpu_seconds(pids)
        client0 = resource.getrusage(resource.RUSAGE_SELF)
        fleet.drain(server.proc.pid, subject.sig, subject.timeout)
        client1 = resource.getrusage(resource.RUSAGE_SELF)
        record["client_cpu_s"] = client1.ru_utime + client1.ru_stime - client0.ru_utime - client0.ru_stime
        if fleet.exit_status is not None:
            # The fleet reaped it (its rusage comes only with the reaping):
            # Popen must not wait for it again.
            server.proc.returncode = fleet.exit_status
            # wait4 counts the children it reaped too (nginx's worker), as
            # cpu_seconds(process_tree) did before the signal.
            usage = fleet.exit_rusage
            record["proxy_cpu_drain_s"] = usage.ru_utime + usage.ru_stime - proxy_cpu0
        record.update(fleet.summary())
    except RuntimeError as error:  # it did not start or died: recorded, the rest of the run goes on
        record["error"] = str(error)[-2000:]
    finally:
        fleet.close_all()
        server.stop()
    return record


def drain_ok(record: dict, limit_s: float) -> dict[str, bool]:
    """Each of issue 13's drain bars for one wsgate run."""
    opened = record.get("opened") or 0
    return {
        "opened": opened == record["tunnels"] and "error" not in record,
        "closes": opened > 0 and record.get("close_frames") == opened,
        "codes": opened > 0 and set(record.get("close_codes", {})) == {"1012"},
        "last": record.get("last_close_s") is not None and record["last_close_s"] <= limit_s,
        "no_1006": (record.get("ended_without_close", 1) + record.get("still_open_at_timeout", 1)) == 0
                   and not record.get("ended_before_signal"),
        "exit": record.get("exit_status") == 0,
    }


def drain_markdown(records: list[dict], opts: argparse.Namespace) -> str:
    limit = duration_secs(opts.drain_spread) + 0.5
    mine = [r for r in records if r["target"] == "wsgate"]
    checks = [drain_ok(r, limit) for r in mine]

    def verdict(name: str) -> str:
        return "—" if not checks else ("met" if all(c[name] for c in checks) else "missed")

    def secs(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    def codes(r: dict) -> str:
        seen = r.get("close_codes") or {}
        return ", ".join(f"{code} × {n:,}" for code, n in seen.items()) or "none"

    def spread(r: dict) -> str:
        if r.get("close_p50_s") is None:
            return "—"
        return " / ".join(f"{r[k]:.2f}" for k in ("close_p10_s", "close_p50_s", "close_p90_s"))

    def without(r: dict) -> str:
        count = r.get("ended_without_close", 0) + r.get("still_open_at_timeout", 0)
        early = sum((r.get("ended_before_signal") or {}).values())
        return f"{count:,}" + (f" (+ {early:,} before the signal)" if early else "")

    def ms(value: float | None) -> str:
        return "—" if value is None else fmt(value * 1e3)

    figures: list[tuple[str, Callable[[dict], str], str, str]] = [
        ("idle TLS WebSockets open at the signal / asked for",
         lambda r: f"{r.get('opened', 0):,} / {r['tunnels']:,}", "all", verdict("opened")),
        ("Close frames received / open", lambda r: f"{r.get('close_frames', 0):,} / {r.get('opened', 0):,}",
         "all", verdict("closes")),
        ("close codes seen", codes, "1012 only", verdict("codes")),
        ("first Close, s after the signal", lambda r: secs(r.get("first_close_s")), "", ""),
        ("Close arrivals p10 / p50 / p90, s after the signal", spread, "", ""),
        ("last Close, s after the signal", lambda r: secs(r.get("last_close_s")),
         f"≤ {limit:g} s (drain_spread + 0.5 s)", verdict("last")),
        ("ended without a Close (a client sees 1006)", without, "0", verdict("no_1006")),
        ("last TCP close, s after the signal", lambda r: secs(r.get("last_tcp_close_s")), "", ""),
        ("process exit, s after the signal", lambda r: secs(r.get("exit_s")), "", ""),
        ("process exit, s after the last Close", lambda r: secs(r.get("exit_after_last_close_s")), "", ""),
        ("exit status", lambda r: "—" if r.get("exit_status") is None else str(r["exit_status"]), "0",
         verdict("exit")),
        ("proxy CPU ms from the signal to the exit", lambda r: ms(r.get("proxy_cpu_drain_s")), "", ""),
        ("proxy RSS KiB per tunnel before the signal", lambda r: fmt(r.get("proxy_rss_per_tunnel_kib")), "", ""),
        ("client's longest event batch, ms (how late a time can be)",
         lambda r: fmt(r.get("client_longest_batch_ms")), "", ""),
    ]
    names = {"wsgate": "wsgate", "nginx": "nginx", "haproxy": "HAProxy"}
    head = ["figure", *[f"{names[r['target']]} {r['signal']} #{r['run']}" for r in records], "bar (issue 13)", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, cell, bar, met in figures:
        cells = [cell(r) if "error" not in r or label.startswith("idle") else "error" for r in records]
        lines.append("| " + " | ".join([label, *cells, bar, met]) + " |")
    errors = [f"- {names[r['target']]} #{r['run']}: {r['error'].splitlines()[0]}" for r in records if "error" in r]
    peers = any(r["target"] != "wsgate" for r in records)
    notes = [
        f"{opts.drain_tunnels:,} idle TLS WebSockets through each proxy from one Python client on CPU 0 "
        f"(benches/wsdrain.py); wsgate with drain_spread = \"{opts.drain_spread}\", drain_timeout = "
        f"\"{DRAIN_TIMEOUT}\", ping_interval = \"{PING_INTERVAL}\". Each client answers the Close with a "
        "masked Close of the same code and waits for the server's TCP close. Times are taken when the "
        "client handles the bytes: late by at most its longest event batch.",
        "nginx and HAProxy send no WebSocket Close when they stop: nginx (SIGQUIT, graceful) keeps upgraded "
        "connections until worker_shutdown_timeout, HAProxy (SIGUSR1, soft stop) until hard-stop-after, then "
        "they close the TCP connections, which a client sees as 1006 (without those limits they wait for the "
        "clients to leave). " + (f"Measured above with both limits at {PEER_DRAIN_LIMIT_S} s." if peers
                                 else "Not measured in this run (--drain-peers measures it)."),
    ]
    return "\n\n".join(["\n".join(lines), *(["\n".join(errors)] if errors else []), *notes])


def describe_drain(record: dict) -> str:
    head = f"drain #{record['run']} {record['target']:8} {record['signal']:8}"
    if "error" in record:
        return f"{head} ERROR {record['error'][:300]}"
    last = record.get("last_close_s")
    exit_s = record.get("exit_s")
    return (f"{head} open {record.get('opened', 0)}/{record['tunnels']} in {record.get('open_s', 0):.1f} s  "
            f"Close {record.get('close_frames', 0)} codes {record.get('close_codes')}  "
            f"last Close {'—' if last is None else f'{last:.3f} s'}  "
            f"without Close {record.get('ended_without_close', 0) + record.get('still_open_at_timeout', 0)}  "
            f"exit {'—' if exit_s is None else f'{exit_s:.3f} s'} status {record.get('exit_status')}")


# --------------------------------------------------------------------------
# Setup


def build(opts: argparse.Namespace) -> Path:
    """Builds wsgate and returns a private copy of the binary: others may
    rebuild target/release/wsgate while we run, and a proxy restarted for a
    memory run must be the same program as the one measured before it."""
    if opts.no_build:
        if not BUILT.exists():
            sys.exit(f"{BUILT} does not exist; run without --no-build")
    else:
        print("building wsgate (cargo build --release) ...", flush=True)
        subprocess.run(["cargo", "build", "--release", "--bin", "wsgate"], cwd=ROOT, check=True, timeout=1800)
    OUT.mkdir(parents=True, exist_ok=True)
    copy = OUT / "wsgate-under-test"
    shutil.copy2(BUILT, copy)
    return copy


def find_tool(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.path.exists(p)), None)


def ensure_peers() -> tuple[str, str]:
    if not (find_tool("nginx") and find_tool("haproxy")):
        print("installing nginx and haproxy from the distribution ...", flush=True)
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "nginx", "haproxy"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(cmd, env=env, timeout=600).returncode != 0:
            # A fresh machine has no package lists yet.
            subprocess.run(["apt-get", "update"], env=env, check=True, timeout=600)
            subprocess.run(cmd, env=env, check=True, timeout=600)
    nginx, haproxy = find_tool("nginx"), find_tool("haproxy")
    if not (nginx and haproxy):
        sys.exit("nginx or haproxy is still missing after apt-get install")
    return nginx, haproxy


def versions(nginx: str, haproxy: str) -> dict:
    def out(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (done.stdout + done.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    rev = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if not rev or "fatal" in rev or "unknown" in rev:
        rev = "no commit yet"
    dirty = out(["git", "-C", str(ROOT), "status", "--porcelain"])
    return {
        "nginx": out([nginx, "-v"]),
        "haproxy": out([haproxy, "-v"]),
        "openssl": out(["openssl", "version"]),
        "wsgate": out([str(WSGATE), "--version"]),
        "wsgate_binary": f"{BUILT} built {datetime.datetime.fromtimestamp(BUILT.stat().st_mtime).isoformat(timespec='seconds')}, "
                         f"sha256 {hashlib.sha256(WSGATE.read_bytes()).hexdigest()[:16]}",
        "wsgate_git_rev": rev + (" (+ uncommitted changes)" if dirty and dirty != "unknown" else ""),
    }


def machine() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "nofile_limit": resource.getrlimit(resource.RLIMIT_NOFILE)}


def tls_resumes(port: int) -> bool | None:
    """Whether the listener resumes a TLS 1.3 session (openssl s_client probe)."""
    if not shutil.which("openssl"):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        session = Path(tmp) / "session.pem"
        base = ["openssl", "s_client", "-connect", f"{LOOPBACK}:{port}", "-servername", "localhost", "-tls1_3"]
        for extra in (["-sess_out", str(session)], ["-sess_in", str(session)]):
            proc = subprocess.Popen(base + extra, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            # TLS 1.3 tickets come after the handshake: keep stdin open a moment.
            time.sleep(0.4)
            try:
                out, _ = proc.communicate(input=b"", timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return None
            if not session.exists():
                return False
        return b"Reused," in out


def preflight(targets: list[Target], kinds: set[str]) -> None:
    """One short handshake run per listener, so that a config mistake stops
    us now and not after ten minutes."""
    for target in targets:
        for kind, url in target.urls.items():
            if kind not in kinds:
                continue
            report, err, _, _ = run_load(url, ["--mode", "handshake", "--connections", "2", "--duration", "1s"], 1)
            ok = report is not None and report["handshakes"]["succeeded"] > 0 and report["handshakes"]["failed"] == 0
            print(f"  preflight {target.name:8} {kind:6} {url:32} {'ok' if ok else 'FAILED'}", flush=True)
            if not ok:
                detail = json.dumps(report) if report else err
                raise RuntimeError(f"{target.name} {url} does not upgrade:\n{detail}\n"
                                   f"server log:\n{tail(target.server.log_path())}")


def preflight_h2(targets: list[Target]) -> None:
    """As preflight, for WebSockets over h2: ALPN h2 and RFC 8441 on each listener."""
    for target in targets:
        url = target.urls["h2"]
        report, err, _, _ = run_load(url, ["--h2", "--mode", "handshake", "--connections", "2",
                                           "--duration", "1s"], 1)
        ok = report is not None and report["handshakes"]["succeeded"] > 0 and report["handshakes"]["failed"] == 0
        print(f"  preflight {target.name:8} h2     {url:32} {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            detail = json.dumps(report) if report else err
            raise RuntimeError(f"{target.name} {url} does not carry WebSockets over h2:\n{detail}\n"
                               f"server log:\n{tail(target.server.log_path())}")


# --------------------------------------------------------------------------
# Summary


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits - 1}f}" if magnitude >= 1 else f"{value:.{digits}f}"


PEERS = ("nginx", "haproxy")


@dataclass
class Row:
    figure: str
    values: dict[str, float | None]
    lower_is_better: bool
    bar: str = ""
    verdict: str = ""
    ratio: float | None = None
    # The bar as a ratio to the better peer; None = no ratio bar.
    limit: float | None = None


def summarise(runs: list[dict], works: list[Workload], target_names: list[str]) -> tuple[list[Row], dict]:
    def med(workload: str, target: str, key: str) -> float | None:
        return median([r.get(key) for r in runs if r["workload"] == workload and r["target"] == target])

    # The bar for each figure: ratio to the better peer, or absolute.
    bars = {
        "tls_handshake_full": ("cpu", 0.75, "≤ 0.75× better peer"),
        "plain_handshake": ("cpu", 1.0, "≤ better peer"),
        "echo": ("cpu", 1.0, "≤ better peer"),
        "bulk": ("cpu", 1.0, "≤ better peer"),
        "echo_paced": ("p99", 1.0, "≤ better peer"),
        "h2_echo": ("cpu", 1.0, "≤ HAProxy (h2)"),
        "h2_get": ("cpu", 1.0, "≤ better peer (h2)"),
    }
    rows: list[Row] = []
    medians: dict = {}
    for work in works:
        medians[work.key] = {t: {k: med(work.key, t, k) for k in
                                 ("cpu_per_unit", "rate", "rtt_p99_ms", "rtt_p50_ms", "kib_per_connection",
                                  "proxy_core_busy", "client_core_busy", "load_cpu_share", "held_connections", "foreign_cores",
                                  "handshake_p99_ms")}
                             for t in target_names}
        get = lambda key: {t: medians[work.key][t][key] for t in target_names}  # noqa: E731
        if work.hold:
            held = get("held_connections")
            count = next((int(v) for v in held.values() if v), work.hold)
            # The backend is shared by every target and not restarted per run,
            # so its figure would mostly measure reuse of freed memory: omitted
            # from the table (it is in the JSON).
            values = {t: v if t != "direct" else None for t, v in get("kib_per_connection").items()}
            what = "over h2" if work.h2_clients else "TLS"
            row = Row(f"proxy RSS KiB per idle {what} WebSocket, {count:,} held (wsgate: ping_interval {PING_INTERVAL})",
                      values, True)
            if work.hold >= 5000:
                # Issue 4's bar was 15 KiB without pings; issue 13's is 10 with them.
                row.bar = "≤ 10 KiB (issue 13)"
                value = row.values.get("wsgate")
                row.verdict = "—" if value is None else ("met" if value <= 10 else "missed")
            rows.append(row)
            continue
        kind, limit, bar = bars.get(work.key, ("cpu", None, ""))
        cpu_row = Row(work.cpu_label, {t: v if t != "direct" else None for t, v in get("cpu_per_unit").items()}, True)
        if work.key == "echo_paced":
            p99 = Row("echo round trip p99 ms at ~5,000 msg/s (TLS; direct = ws)", get("rtt_p99_ms"), True, bar)
            rows.append(p99)
            rows.append(Row(work.rate_label, get("rate"), False))
            rows.append(cpu_row)
            target_row = p99
        else:
            cpu_row.bar = bar
            rows.append(cpu_row)
            rows.append(Row(work.rate_label, get("rate"), False))
            target_row = cpu_row
        if limit is not None:
            target_row.bar = bar
            target_row.limit = limit

    for row in rows:
        if row.limit is None and row.ratio is not None:
            continue
        peers = [row.values.get(p) for p in PEERS if row.values.get(p) is not None]
        mine = row.values.get("wsgate")
        if peers and mine is not None:
            best = min(peers) if row.lower_is_better else max(peers)
            row.ratio = mine / best if best else None
        if row.limit is not None:
            row.verdict = "—" if row.ratio is None else ("met" if row.ratio <= row.limit else "missed")

    rows += h2_rows(medians, target_names)

    failures = {t: sum(r.get("failures", 0) or 0 for r in runs if r["target"] == t) +
                sum(1 for r in runs if r["target"] == t and "error" in r) for t in target_names}
    fail_row = Row("failed handshakes or broken tunnels, all runs", {t: float(v) for t, v in failures.items()}, True,
                   "0", "met" if failures.get("wsgate", 0) == 0 else "missed")
    rows.append(fail_row)
    return rows, medians


def h2_rows(medians: dict, target_names: list[str]) -> list[Row]:
    """--h2's bars that compare wsgate with itself: the h2 figure over the
    HTTP/1.1 figure of the same run (ratio column = h2 ÷ HTTP/1.1)."""
    def value(work: str, target: str, key: str) -> float | None:
        return medians.get(work, {}).get(target, {}).get(key)

    pairs = [
        ("CPU per echoed 128 B message: h2 ÷ HTTP/1.1", "h2_echo", "echo", "cpu_per_unit", None, "(beside)"),
        ("CPU per new WebSocket: h2 stream ÷ full TLS handshake + upgrade", "h2_stream", "tls_handshake_full",
         "cpu_per_unit", 0.2, "≤ 0.2×"),
        ("RSS per idle WebSocket: h2 (1,000 on 10 conns) ÷ HTTP/1.1 (1,000)", "h2_hold_1000", "hold_1000",
         "kib_per_connection", 1.0, "≤ 1.0×"),
    ]
    rows = []
    for figure, h2, h1, key, limit, bar in pairs:
        if h2 not in medians or h1 not in medians:
            continue
        values = {}
        for t in target_names:
            mine, base = value(h2, t, key), value(h1, t, key)
            values[t] = mine / base if mine is not None and base else None
        row = Row(figure, values, True, bar)
        row.ratio = values.get("wsgate")
        if limit is not None:
            row.verdict = "—" if row.ratio is None else ("met" if row.ratio <= limit else "missed")
        rows.append(row)
    return rows


LABELS = {"nginx": "nginx", "haproxy": "HAProxy", "wsgate": "wsgate", "before": "wsgate before",
          "direct": "direct (ws)"}


def markdown(rows: list[Row], target_names: list[str]) -> str:
    with_before = "before" in target_names
    head = ["figure", *[LABELS[t] for t in target_names], "wsgate ÷ better peer",
            *(["wsgate ÷ before"] if with_before else []), "bar (issue 4 unless named)", "met?"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        since = []
        if with_before:
            mine, before = row.values.get("wsgate"), row.values.get("before")
            since = ["—" if not (mine is not None and before) else f"{mine / before:.2f}×"]
        cells = [row.figure, *[fmt(row.values.get(t)) for t in target_names],
                 "—" if row.ratio is None else f"{row.ratio:.2f}×", *since, row.bar, row.verdict]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bottleneck_table(medians: dict, works: list[Workload], target_names: list[str]) -> str:
    """Median busy share of each core: ~100 % on CPU 1 means the proxy was the
    limit; ~100 % on CPU 0 means the load tool + backend were. The last column
    is CPU that other users of this shared machine took meanwhile."""
    head = ["workload", *[f"{LABELS[t]}: CPU1 / CPU0" for t in target_names], "noise (cores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    pct = lambda v: "—" if v is None else f"{v * 100:.0f} %"  # noqa: E731
    for work in works:
        cells = [work.title]
        for t in target_names:
            m = medians[work.key][t]
            cells.append(f"{pct(m['proxy_core_busy'])} / {pct(m['client_core_busy'])}")
        noise = median([medians[work.key][t]["foreign_cores"] for t in target_names])
        cells.append("—" if noise is None else f"{noise:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per throughput/handshake run (default 5)")
    parser.add_argument("--hold", default=",".join(map(str, DEFAULT_HOLD)),
                        help=f"idle connection counts for the memory runs (default {','.join(map(str, DEFAULT_HOLD))}; "
                             "~9,980 is the most one proxy process can hold under a 20,000 open-file limit)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 1 round, 2 s runs, 500 and 2,000 held connections, 1,000 drained")
    parser.add_argument("--workloads", help="comma-separated subset of workloads (default all; `drain` is the "
                                            "drain phase)")
    parser.add_argument("--drain-tunnels", type=int, default=9000,
                        help="idle TLS WebSockets held through wsgate when it gets SIGTERM (default 9000; "
                             "~9,980 is the most one proxy can hold under a 20,000 open-file limit)")
    parser.add_argument("--drain-spread", default="5s",
                        help="wsgate's drain_spread in the drain runs (default 5s); the bar is every Close "
                             "within this + 0.5 s")
    parser.add_argument("--drain-runs", type=int,
                        help="drain runs of wsgate, each with a fresh process (default: --rounds)")
    parser.add_argument("--drain-peers", action="store_true",
                        help=f"also drain nginx (SIGQUIT) and HAProxy (SIGUSR1) once, with a {PEER_DRAIN_LIMIT_S} s "
                             "shutdown limit, to show what their clients see (no Close frames)")
    parser.add_argument("--targets", default="nginx,haproxy,wsgate,direct",
                        help="comma-separated subset of nginx,haproxy,wsgate,direct")
    parser.add_argument("--h2", action="store_true",
                        help="the HTTP/2 rows instead of the others: RFC 8441 WebSockets through wsgate and HAProxy "
                             "beside the same run's HTTP/1.1 figures, and plain GETs over h2 (h2load) through "
                             "nginx, HAProxy and wsgate")
    parser.add_argument("--no-build", action="store_true", help="use target/release/wsgate as it is")
    parser.add_argument("--out", type=Path, default=OUT / "results.json", help="JSON output path")
    parser.add_argument("--baseline", type=Path,
                        help="an earlier wsgate binary, run as the extra target \"before\" with the same "
                             "config, so a change is measured against its parent in the same run")
    opts = parser.parse_args()
    if opts.quick:
        opts.rounds, opts.duration = 1, 2.0
        if opts.hold == parser.get_default("hold"):
            opts.hold = "500,2000"
        if opts.drain_tunnels == parser.get_default("drain_tunnels"):
            opts.drain_tunnels = 1000
    opts.hold = [int(n) for n in opts.hold.split(",") if n.strip()] if opts.hold else []
    opts.workloads = [w.strip() for w in opts.workloads.split(",") if w.strip()] if opts.workloads else None
    if opts.h2 and opts.targets == parser.get_default("targets"):
        opts.targets = "nginx,haproxy,wsgate"
    opts.targets = [t.strip() for t in opts.targets.split(",")]
    if opts.h2:
        # Its rows compare with hold_1000 over HTTP/1.1, and there is no h2 drain.
        opts.hold = [1000]
        if opts.workloads is None:
            opts.workloads = list(H2_SET)
        if "direct" in opts.targets:
            opts.targets.remove("direct")
    # The drain is a phase of its own, not a Workload: the process it
    # measures ends, and only wsgate (and its peers, on request) take part.
    opts.drain = opts.workloads is None or "drain" in opts.workloads
    if opts.workloads is not None:
        opts.workloads = [w for w in opts.workloads if w != "drain"]
    if opts.drain and "wsgate" not in opts.targets:
        if opts.workloads is not None and not opts.workloads:
            sys.exit("the drain measures wsgate: --targets must include wsgate")
        opts.drain = False
    try:
        duration_secs(opts.drain_spread)
    except argparse.ArgumentTypeError as error:
        sys.exit(f"--drain-spread: {error}")
    if opts.drain_tunnels < 1:
        sys.exit("--drain-tunnels must be at least 1")
    if opts.drain_runs is None:
        opts.drain_runs = opts.rounds
    if opts.baseline is not None and "before" not in opts.targets:
        opts.targets.insert(opts.targets.index("wsgate") + 1 if "wsgate" in opts.targets else 0, "before")
    if "before" in opts.targets and opts.baseline is None:
        sys.exit("the target \"before\" needs --baseline PATH")
    if any(t not in LABELS for t in opts.targets):
        sys.exit(f"--targets takes a subset of {','.join(LABELS)}")
    return opts


def main() -> int:
    opts = parse_args()
    if os.uname().sysname != "Linux":
        sys.exit("this benchmark reads /proc and pins CPUs: Linux only")
    # SIGTERM/SIGHUP end the run like Ctrl-C, so `finally` stops everything.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: sys.exit(130))
    global WSGATE
    WSGATE = build(opts)
    nginx, haproxy = ensure_peers()
    if opts.h2 and not find_tool("h2load"):
        print("installing h2load (nghttp2-client) from the distribution ...", flush=True)
        subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "nghttp2-client"],
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, check=True, timeout=600)
    if (os.cpu_count() or 1) < 2:
        print("warning: fewer than 2 CPUs; proxy and load tool will share one", file=sys.stderr)
    # This script polls /proc during memory runs, and is the drain's client:
    # keep it off the proxies' core.
    os.sched_setaffinity(0, {int(CLIENT_CPU)})
    # The drain's clients are this process's own sockets.
    raise_nofile()

    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir()
    subprocess.run([str(WSGATE), "cert", "--out", str(work), "--name", "bench", "localhost", LOOPBACK],
                   check=True, timeout=30, stdout=subprocess.DEVNULL)
    cert, key = work / "bench.crt", work / "bench.key"
    # HAProxy wants the certificate and its key in one PEM.
    pem = work / "bench.pem"
    pem.write_bytes(cert.read_bytes() + key.read_bytes())

    names = ("nginx", "haproxy", "wsgate", "before", "nginx-drain", "haproxy-drain", "wsgate-drain")
    ports = iter(free_ports(4 + 2 * len(names)))
    backend_port = next(ports)
    p = {name: {"tls": next(ports), "plain": next(ports)} for name in names}
    # --h2: nginx and HAProxy get a listener of their own that offers h2, and
    # the plain GETs go to an HTTP backend.
    http_port = None
    if opts.h2:
        http_port = next(ports)
        p["nginx"]["h2"], p["haproxy"]["h2"] = next(ports), next(ports)
    (work / "nginx.conf").write_text(nginx_conf(work, p["nginx"]["tls"], p["nginx"]["plain"], backend_port, cert, key,
                                                h2=p["nginx"].get("h2"), http_backend=http_port))
    (work / "haproxy.cfg").write_text(haproxy_cfg(p["haproxy"]["tls"], p["haproxy"]["plain"], backend_port, pem,
                                                  h2=p["haproxy"].get("h2"), http_backend=http_port))
    configs = {"wsgate": write_wsgate_config(
        WSGATE, work / "wsgate.toml",
        lambda pings: wsgate_toml(p["wsgate"]["tls"], p["wsgate"]["plain"], backend_port, cert, key, pings,
                                  http_backend=http_port), False)}
    # Every drain run gets a process of its own, on listeners of its own, so
    # a port in the other proxies' TIME_WAIT or a leftover never gets in the way.
    configs["wsgate-drain"] = write_wsgate_config(
        WSGATE, work / "wsgate-drain.toml",
        lambda pings: wsgate_toml(p["wsgate-drain"]["tls"], p["wsgate-drain"]["plain"], backend_port, cert, key,
                                  pings, drain_spread=opts.drain_spread), False)
    (work / "nginx-drain.conf").write_text(nginx_conf(
        work, p["nginx-drain"]["tls"], p["nginx-drain"]["plain"], backend_port, cert, key, name="nginx-drain",
        main_extra=f"worker_shutdown_timeout {PEER_DRAIN_LIMIT_S}s;"))
    (work / "haproxy-drain.cfg").write_text(haproxy_cfg(
        p["haproxy-drain"]["tls"], p["haproxy-drain"]["plain"], backend_port, pem,
        global_extra=f"hard-stop-after {PEER_DRAIN_LIMIT_S}s"))

    quiet = {"RUST_LOG": "warn"}  # the equivalent of access_log off
    backend = Server("backend", [str(WSGATE), "echo", "--listen", f"{LOOPBACK}:{backend_port}"],
                     [backend_port], CLIENT_CPU, work, quiet)
    http_backend = None
    if http_port is not None:
        (work / "http-backend.conf").write_text(http_backend_conf(work, http_port))
        http_backend = Server("http-backend", [nginx, "-p", str(work), "-e", str(work / "http-backend-error.log"),
                                               "-c", str(work / "http-backend.conf")],
                              [http_port], CLIENT_CPU, work)
    servers = {
        "nginx": Server("nginx", [nginx, "-p", str(work), "-e", str(work / "nginx-error.log"),
                                  "-c", str(work / "nginx.conf")],
                        list(p["nginx"].values()), PROXY_CPU, work),
        "haproxy": Server("haproxy", [haproxy, "-db", "-f", str(work / "haproxy.cfg")],
                          list(p["haproxy"].values()), PROXY_CPU, work),
        "wsgate": Server("wsgate", [str(WSGATE), "run", "-c", str(work / "wsgate.toml")],
                         list(p["wsgate"].values()), PROXY_CPU, work, quiet),
    }
    if opts.baseline is not None:
        # A private copy, like the binary under test: the path may be rebuilt.
        before = OUT / "wsgate-before"
        shutil.copy2(opts.baseline, before)
        configs["before"] = write_wsgate_config(
            before, work / "before.toml",
            lambda pings: wsgate_toml(p["before"]["tls"], p["before"]["plain"], backend_port, cert, key, pings,
                                      http_backend=http_port), True)
        servers["before"] = Server("before", [str(before), "run", "-c", str(work / "before.toml")],
                                   list(p["before"].values()), PROXY_CPU, work, quiet)

    def urls(name: str) -> dict[str, str]:
        found = {"tls": f"wss://localhost:{p[name]['tls']}/", "plain": f"ws://{LOOPBACK}:{p[name]['plain']}/"}
        if opts.h2:
            # wsgate's TLS listener offers h2 and http/1.1 already.
            found["h2"] = f"wss://localhost:{p[name].get('h2', p[name]['tls'])}/"
        return found

    all_targets = {name: Target(name, LABELS[name], servers[name], True, urls(name)) for name in servers}
    all_targets["direct"] = Target("direct", LABELS["direct"], backend, False,
                                   {"plain": f"ws://{LOOPBACK}:{backend_port}/"})
    targets = [all_targets[t] for t in opts.targets]
    works = workloads(opts)
    drain_subjects = []
    if opts.drain:
        def drain_server(name: str, argv: list[str], env: dict[str, str] | None = None) -> Server:
            return Server(name, argv, list(p[name].values()), PROXY_CPU, work, env or {})

        drain_subjects.append(DrainSubject(
            "wsgate", drain_server("wsgate-drain", [str(WSGATE), "run", "-c", str(work / "wsgate-drain.toml")], quiet),
            p["wsgate-drain"]["tls"], signal.SIGTERM, duration_secs(DRAIN_TIMEOUT) + 10))
        if opts.drain_peers:
            drain_subjects.append(DrainSubject(
                "nginx", drain_server("nginx-drain", [nginx, "-p", str(work), "-e", str(work / "nginx-drain-error.log"),
                                                      "-c", str(work / "nginx-drain.conf")]),
                p["nginx-drain"]["tls"], signal.SIGQUIT, PEER_DRAIN_LIMIT_S + 10))
            drain_subjects.append(DrainSubject(
                "haproxy", drain_server("haproxy-drain", [haproxy, "-db", "-f", str(work / "haproxy-drain.cfg")]),
                p["haproxy-drain"]["tls"], signal.SIGUSR1, PEER_DRAIN_LIMIT_S + 10))
    for name, what in configs.items():
        print(f"  {name} config: {what}", flush=True)

    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": versions(nginx, haproxy),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(opts).items()},
        "ports": {"backend": backend_port, **p},
        "pinning": {"proxy_cpu": PROXY_CPU, "load_and_backend_cpu": CLIENT_CPU},
        "wsgate_configs": configs,
        "ping_interval": f"wsgate's route pings idle clients every {PING_INTERVAL}; nginx and HAProxy have no "
                         "WebSocket pings (their configs have nothing equivalent)",
    }
    runs: list[dict] = []
    drains: list[dict] = []
    started = time.monotonic()
    try:
        backend.start()
        if http_backend is not None:
            http_backend.start()
        print(f"work dir {work}; backend on {backend_port}", flush=True)
        if works:
            for target in targets:
                if target.is_proxy:
                    target.server.start()
            kinds = ({w.listener for w in works} | {"plain"}) - {"h2"}
            preflight(targets, kinds)
            if opts.h2:
                preflight_h2([t for t in targets if t.name in RFC8441_PEERS])
            meta["tls_resumption"] = {t.name: tls_resumes(p[t.name]["tls"]) for t in targets if t.is_proxy}
            meta["server_threads"] = {t.name: sum(status_field(pid, "Threads") for pid in t.server.pids())
                                      for t in targets}
            print(f"  TLS 1.3 session resumption per listener: {json.dumps(meta['tls_resumption'])}", flush=True)

        for round_no in range(1, opts.rounds + 1 if works else 1):
            # Rotate the order each round so that no target always runs first
            # (right after a memory run, say) or last.
            shift = (round_no - 1) % len(targets)
            order = targets[shift:] + targets[:shift]
            for work_item in works:
                for target in order:
                    if target.name == "direct" and not work_item.with_direct:
                        continue
                    if work_item.only is not None and target.name not in work_item.only:
                        continue
                    measured_backend = http_backend if work_item.driver == "h2load" and http_backend else backend
                    record = run_one(target, work_item, opts, measured_backend, round_no)
                    runs.append(record)
                    print("  " + describe(record, work_item), flush=True)
                    # Let closed sockets and the allocator settle between runs.
                    time.sleep(1.0 if not work_item.hold else 2.0)
            print(f"round {round_no}/{opts.rounds} done at {time.monotonic() - started:.0f} s", flush=True)

        if drain_subjects:
            # The other proxies sit idle from here on; stopped, they cannot
            # take CPU 1 or descriptors from the drained one.
            for target in targets:
                if target.is_proxy:
                    target.server.stop()
            runs_of = {"wsgate": opts.drain_runs}  # the peers' timeouts vary little: once is enough
            for subject in drain_subjects:
                for run_no in range(1, runs_of.get(subject.name, 1) + 1):
                    record = drain_run(subject, opts, run_no)
                    drains.append(record)
                    print("  " + describe_drain(record), flush=True)
                    # The closed tunnels' sockets leave TIME_WAIT behind on the
                    # backend's port; a moment keeps the next run's opening clean.
                    time.sleep(2.0)
            print(f"drain done at {time.monotonic() - started:.0f} s", flush=True)
    finally:
        REGISTRY.stop_all()

    names = [t.name for t in targets]
    rows, medians = summarise(runs, works, names)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    parts = []
    if works:
        table = markdown(rows, names)
        busy = bottleneck_table(medians, works, names)
        parts.append(f"{table}\n\nMedian core utilisation during each run "
                     f"(CPU 1 = the proxy's own processes, CPU 0 = load tool + backend):\n\n{busy}\n")
        parts.append(f"wsgate's route has ping_interval = \"{PING_INTERVAL}\" in every run; nginx and HAProxy "
                     "have no WebSocket pings. Configs: " +
                     "; ".join(f"{name}: {what}" for name, what in configs.items() if not name.endswith("-drain")) +
                     ".\n")
    if drains:
        parts.append(f"Drain: a graceful stop with {opts.drain_tunnels:,} idle TLS WebSockets open:\n\n"
                     f"{drain_markdown(drains, opts)}\n")
    report_md = "\n".join(parts)
    print()
    print(report_md)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({"meta": meta, "medians": medians,
                                    "table": [row.__dict__ for row in rows], "runs": runs, "drain": drains},
                                   indent=1, default=str))
    opts.out.with_suffix(".md").write_text(report_md)
    print(f"wrote {opts.out} and {opts.out.with_suffix('.md')} ({meta['elapsed_s']:.0f} s)")
    return 0


def describe(record: dict, work: Workload) -> str:
    head = f"r{record['round']} {work.key:22} {record['target']:8}"
    if "error" in record:
        return f"{head} ERROR {record['error'][:300]}"
    parts = [f"{work.rate_label.split(' (')[0]} {fmt(record.get('rate'))}"]
    if record.get("cpu_per_unit") is not None:
        parts.append(f"cpu/{work.unit_name} {fmt(record['cpu_per_unit'])}")
    if record.get("rtt_p99_ms") is not None:
        parts.append(f"p99 {record['rtt_p99_ms']:.3f} ms")
    if record.get("kib_per_connection") is not None:
        parts.append(f"{record['kib_per_connection']:.1f} KiB/conn over {record['held_connections']}")
    if record.get("proxy_core_busy") is not None:
        parts.append(f"cpu1 {record['proxy_core_busy'] * 100:.0f}%")
    if record.get("client_core_busy") is not None:
        parts.append(f"cpu0 {record['client_core_busy'] * 100:.0f}%")
    if record.get("foreign_cores") is not None:
        parts.append(f"noise {record['foreign_cores']:.2f} cores")
    if record.get("failures"):
        parts.append(f"FAILURES {record['failures']}")
    return f"{head} " + "  ".join(parts)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        REGISTRY.stop_all()
        sys.exit(130)
