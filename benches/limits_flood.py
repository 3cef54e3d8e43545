"""Issue 14 figure: wsgate RSS growth after upgrades from 100,000 distinct source
addresses (127.1.0.1 ... spread over 127/8) on a route with handshake_rate = "1/m",
so no bucket refills and every address stays in the rate table. Run after
compare.py has built benches/out/wsgate-under-test: `python3 benches/limits_flood.py`."""
import subprocess, time, os, socket, threading, base64
W=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "wsgate-under-test")
def free():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def rss(pid):
    for l in open(f"/proc/{pid}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1])
echo_port=free(); port=free()
echo=subprocess.Popen([W,"echo","--listen",f"127.0.0.1:{echo_port}"],stderr=subprocess.DEVNULL)
open("/tmp/wsgate-limits-flood.toml","w").write(f'''[[listener]]
addr = "127.0.0.1:{port}"
[upstream.e]
servers = ["127.0.0.1:{echo_port}"]
[[route]]
path = "/"
upstream = "e"
missing_origin = "allow"
handshake_rate = "1/m"
''')
p=subprocess.Popen([W,"run","-c","/tmp/wsgate-limits-flood.toml"],stderr=subprocess.DEVNULL)
time.sleep(1)
req=b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
def one(i):
    src=f"127.{1+(i>>16)}.{(i>>8)&255}.{i&255 or 1}"
    s=socket.socket(); s.settimeout(5)
    try:
        s.bind((src,0)); s.connect(("127.0.0.1",port)); s.sendall(req); s.recv(512)
    except OSError: pass
    finally: s.close()
N=100_000
before=rss(p.pid); t0=time.time()
idx=iter(range(N)); lock=threading.Lock()
def worker():
    while True:
        with lock: i=next(idx,None)
        if i is None: return
        one(i)
ts=[threading.Thread(target=worker) for _ in range(32)]
[t.start() for t in ts]; [t.join() for t in ts]
time.sleep(2)
after=rss(p.pid)
print(f"{N} addresses in {time.time()-t0:.0f}s; RSS before {before} KiB, after {after} KiB, delta {after-before} KiB = {(after-before)*1024/N:.0f} B per address")
p.terminate(); echo.terminate()
