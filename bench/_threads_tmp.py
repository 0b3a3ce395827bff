import sys, os, tempfile, shutil
from pathlib import Path
from contextlib import ExitStack
from run import Target, run_wrk
from services import raise_fd_limit, start_floor, start_gateway, start_nginx, start_python_upstream
raise_fd_limit()
wd = Path(tempfile.mkdtemp())
def tasks(pid):
    out = {}
    for t in os.listdir(f"/proc/{pid}/task"):
        st = open(f"/proc/{pid}/task/{t}/stat").read()
        name = open(f"/proc/{pid}/task/{t}/comm").read().strip()
        f = st.rsplit(")", 1)[1].split()
        out[(t, name)] = (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out
env = dict(x.split("=",1) for x in sys.argv[1:])
with ExitStack() as st:
    def s(x): st.callback(x.stop); return x
    pu = s(start_python_upstream(wd)); ng = s(start_nginx(wd, pu.url))
    fl = s(start_floor(wd, ng.url)); gw = s(start_gateway(wd, ng.url, env))
    for t in [Target("floor", fl.url, None, fl.pid), Target("gw", gw.url, gw.extra["token"], gw.pid)]:
        run_wrk(t, 32, 2, 2)
        a = tasks(t.pid)
        r = run_wrk(t, 32, 2, 6)
        b = tasks(t.pid)
        n = r["requests"]
        print(t.name, round(r["rps"]), round(r["cpu_us"]))
        for k in b:
            d = b[k] - a.get(k, 0)
            if d > 0: print("   ", k[1], round(d / n * 1e6, 1), "us/req")
shutil.rmtree(wd, ignore_errors=True)
