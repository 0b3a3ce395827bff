import sys, tempfile, shutil, statistics, random
from pathlib import Path
from contextlib import ExitStack
import services
from run import Target, run_wrk
from services import raise_fd_limit, start_floor, start_nginx, start_python_upstream, _spawn, free_port, HERE
raise_fd_limit()
wd = Path(tempfile.mkdtemp())
with ExitStack() as st:
    pu = start_python_upstream(wd); st.callback(pu.stop); ng = start_nginx(wd, pu.url); st.callback(ng.stop)
    fl = start_floor(wd, ng.url); st.callback(fl.stop)
    port = free_port()
    lite = _spawn("lite", [sys.executable, str(HERE / "_floorlite_tmp.py"), "--port", str(port), "--upstream", ng.url], wd, f"http://127.0.0.1:{port}")
    st.callback(lite.stop); lite.wait_ready("/")
    ts = [Target("floor", fl.url, None, fl.pid), Target("lite", lite.url, None, lite.pid)]
    for t in ts: print(t.name, run_wrk(t, 32, 2, 2)["status_errors"])
    res = {t.name: [] for t in ts}
    for r in range(4):
        for t in ts:
            f = run_wrk(t, 32, 2, 3); res[t.name].append((f["rps"], f["cpu_us"]))
    for n, v in res.items(): print(n, statistics.median(x[0] for x in v), statistics.median(x[1] for x in v))
shutil.rmtree(wd, ignore_errors=True)
