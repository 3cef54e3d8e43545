"""Issue 14 bar: proxy CPU per plaintext handshake + upgrade with handshake_rate and
max_connections_per_ip set on the route, against the same route without them.
Interleaved rounds; wsgate on CPU 1 with one worker thread, load tool and echo
backend on CPU 0. Run after compare.py has built benches/out/wsgate-under-test:
`python3 benches/limits_cpu.py`."""
import subprocess, time, os, json, statistics, socket
W=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "wsgate-under-test")
def free():
    s=socket.socket(); s.bind(("127.0.0.1",0)); p=s.getsockname()[1]; s.close(); return p
def cpu(pid):
    f=open(f"/proc/{pid}/stat").read().rsplit(")",1)[1].split()
    return (int(f[11])+int(f[12]))/os.sysconf("SC_CLK_TCK")
echo_port=free()
echo=subprocess.Popen(["taskset","-c","0",W,"echo","--listen",f"127.0.0.1:{echo_port}"],stderr=subprocess.DEVNULL)
time.sleep(0.5)
def conf(port, limits):
    return f'''[[listener]]
addr = "127.0.0.1:{port}"
[server]
worker_threads = 1
[upstream.e]
servers = ["127.0.0.1:{echo_port}"]
[[route]]
path = "/"
upstream = "e"
missing_origin = "allow"
{limits}
'''
res={"without":[],"with":[]}
for r in range(5):
    for name,lim in [("without",""),("with",'handshake_rate = "1000000/s"\nmax_connections_per_ip = 100000')]:
        port=free(); open("/tmp/wsgate-limits-cpu.toml","w").write(conf(port,lim))
        p=subprocess.Popen(["taskset","-c","1",W,"run","-c","/tmp/wsgate-limits-cpu.toml"],stderr=subprocess.DEVNULL)
        for _ in range(100):
            try: socket.create_connection(("127.0.0.1",port),0.1).close(); break
            except OSError: time.sleep(0.05)
        c0=cpu(p.pid)
        out=subprocess.run(["taskset","-c","0",W,"load","--url",f"ws://127.0.0.1:{port}/","--mode","handshake","--connections","32","--duration","4s","--json"],capture_output=True,text=True)
        c1=cpu(p.pid)
        rep=json.loads(out.stdout)
        n=rep.get("handshakes",{}).get("succeeded") or rep.get("handshakes_ok") or rep["handshakes"]
        if isinstance(n,dict): n=n.get("ok") or list(n.values())[0]
        res[name].append((c1-c0)/n*1e6)
        p.terminate(); p.wait()
echo.terminate()
for k,v in res.items(): print(k, [round(x,1) for x in v], "median", round(statistics.median(v),1))
print("ratio", round(statistics.median(res["with"])/statistics.median(res["without"]),3))
