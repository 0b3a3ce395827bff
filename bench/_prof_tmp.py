import sys, subprocess, tempfile, shutil
from pathlib import Path
from contextlib import ExitStack
from run import Target, run_wrk
from services import raise_fd_limit, start_floor, start_gateway, start_nginx, start_python_upstream
import hotspots
raise_fd_limit()
wd = Path(tempfile.mkdtemp())
mode = sys.argv[1] if len(sys.argv) > 1 else "--gil"
with ExitStack() as st:
    def s(x): st.callback(x.stop); return x
    pu = s(start_python_upstream(wd)); ng = s(start_nginx(wd, pu.url))
    fl = s(start_floor(wd, ng.url)); gw = s(start_gateway(wd, ng.url))
    for t in [Target("floor", fl.url, None, fl.pid), Target("gw", gw.url, gw.extra["token"], gw.pid)]:
        run_wrk(t, 32, 2, 2)
        out = Path(f"/tmp/prof/{t.name}.raw")
        args = ["py-spy", "record", "--pid", str(t.pid), "--duration", "8", "--rate", "250", "--format", "raw", "--output", str(out)]
        if mode: args.append(mode)
        rec = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(t.name, run_wrk(t, 32, 2, 10))
        rec.wait()
        print(hotspots.report(out, 40))
shutil.rmtree(wd, ignore_errors=True)
