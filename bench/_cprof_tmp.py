import sys, os, tempfile, shutil, subprocess, time, pstats
from pathlib import Path
from contextlib import ExitStack
import services
from run import Target, run_wrk
from services import raise_fd_limit, start_floor, start_gateway, start_nginx, start_python_upstream
raise_fd_limit()
wd = Path(tempfile.mkdtemp())
orig = services._spawn
def spawn(name, argv, workdir, url, env=None):
    if name in ("llm-proxy", "floor"):
        argv = [argv[0], "-m", "cProfile", "-o", f"/tmp/prof/{name}.cprof", *(argv[1:] if name == "floor" else argv[2:])]
        if name == "llm-proxy":
            argv = [sys.executable, "-m", "cProfile", "-o", f"/tmp/prof/{name}.cprof", "-m", "llm_proxy", "serve"]
    return orig(name, argv, workdir, url, env)
services._spawn = spawn
N = {}
with ExitStack() as st:
    pu = start_python_upstream(wd); st.callback(pu.stop); ng = start_nginx(wd, pu.url); st.callback(ng.stop)
    fl = start_floor(wd, ng.url); gw = start_gateway(wd, ng.url)
    for name, svc, t in [("floor", fl, Target("floor", fl.url, None, fl.pid)), ("llm-proxy", gw, Target("gw", gw.url, gw.extra["token"], gw.pid))]:
        r = run_wrk(t, 32, 2, 4)
        N[name] = r["requests"]
        svc.stop(); svc.process.wait()
for name in ("floor", "llm-proxy"):
    s = pstats.Stats(f"/tmp/prof/{name}.cprof")
    calls = sum(v[1] for v in s.stats.values())
    print(name, "requests", N[name], "calls/request", round(calls / N[name], 1), "tottime/request us", round(s.total_tt / N[name] * 1e6))
    rows = sorted(s.stats.items(), key=lambda kv: -kv[1][2])[:60]
    for (f, l, fn), (cc, nc, tt, ct, _) in rows:
        print(f"  {nc/N[name]:7.2f} calls {tt/N[name]*1e6:7.1f}us  {f.split('site-packages/')[-1].split('lib/python3.11/')[-1]}:{l}:{fn}")
shutil.rmtree(wd, ignore_errors=True)
