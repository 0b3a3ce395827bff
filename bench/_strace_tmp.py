import sys, os, tempfile, shutil, subprocess, time
from pathlib import Path
from contextlib import ExitStack
from run import Target, run_wrk
from services import raise_fd_limit, start_floor, start_gateway, start_nginx, start_python_upstream
raise_fd_limit()
wd = Path(tempfile.mkdtemp())
with ExitStack() as st:
    def s(x): st.callback(x.stop); return x
    pu = s(start_python_upstream(wd)); ng = s(start_nginx(wd, pu.url))
    fl = s(start_floor(wd, ng.url)); gw = s(start_gateway(wd, ng.url))
    for t in [Target("floor", fl.url, None, fl.pid), Target("gw", gw.url, gw.extra["token"], gw.pid)]:
        run_wrk(t, 32, 2, 2)
        p = subprocess.Popen(["strace", "-c", "-f", "-p", str(t.pid), "-o", f"/tmp/prof/{t.name}.strace"])
        time.sleep(0.5)
        r = run_wrk(t, 32, 2, 4)
        p.terminate(); p.wait()
        print(t.name, r["requests"])
        print(open(f"/tmp/prof/{t.name}.strace").read()[:2500])
shutil.rmtree(wd, ignore_errors=True)
