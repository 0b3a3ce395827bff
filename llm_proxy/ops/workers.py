"""`serve --workers N`: one parent process and N children serving one port, a dead child restarted.

Each child is a whole gateway that binds the port with SO_REUSEPORT, so the kernel spreads new
connections over them; they share state through the database and Redis, never through the parent.
The parent only starts children, restarts one that dies, and on SIGTERM or SIGINT passes the signal
on and waits for all of them to drain (each within SHUTDOWN_GRACE), killing what is left after
that and a margin. A child reports that it serves by writing to a pipe the parent gave it
(READY_FD, see report_ready). One that ends before it ever did on its first start (a port in use,
a database it cannot open) would fail again: the parent then stops the others and exits with that
child's code, instead of restarting it forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# A child that served this long before it died is restarted at once; one that dies sooner waits
# a doubling delay first (up to MAX_BACKOFF), so a child that keeps crashing does not spin.
STABLE_AFTER = 30.0
FIRST_BACKOFF = 0.1
MAX_BACKOFF = 10.0
# The variable naming the pipe a child writes to once it serves.
READY_FD = "LLM_PROXY_READY_FD"
# How long past SHUTDOWN_GRACE the parent waits for a draining child before it kills it.
KILL_MARGIN = 5.0


def is_worker() -> bool:
    """Tell whether this process was started by a Supervisor (and has not reported ready yet)."""
    return READY_FD in os.environ


def report_ready() -> None:
    """In a child: tell the parent this worker serves (once; nothing when not started by a Supervisor)."""
    fd = os.environ.pop(READY_FD, None)
    if fd is None:
        return
    try:
        os.write(int(fd), b"1")
        os.close(int(fd))
    except OSError:  # the parent is gone: nothing to tell
        pass


async def _reported(read_fd: int) -> bool:
    """Wait for the child's byte on the pipe: True when it came, False when the pipe closed without one."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                os.fdopen(read_fd, "rb", buffering=0))
    try:
        return bool(await reader.read(1))
    finally:
        transport.close()


@dataclass
class _Child:
    number: int
    process: asyncio.subprocess.Process | None = None
    started: float = 0.0
    starts: int = 0
    served: bool = False  # reported ready at least once
    backoff: float = FIRST_BACKOFF


class Supervisor:
    """Run `command(number)` for numbers 1..count, each with `environment(number)`, until told to stop.

    The children inherit stdin, stdout and stderr (their logs go where the parent's would).
    """

    def __init__(self, count: int, command: Callable[[int], Sequence[str]],
                 environment: Callable[[int], dict[str, str]], *, grace: float, kill_margin: float = KILL_MARGIN,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self._children = [_Child(number) for number in range(1, count + 1)]
        self._command = command
        self._environment = environment
        self._grace = grace
        self._kill_margin = kill_margin
        self._clock = clock
        self._stopping = asyncio.Event()
        self._failed_code: int | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        """The process ids of the children running now."""
        return [child.process.pid for child in self._children
                if child.process is not None and child.process.returncode is None]

    def stop(self) -> None:
        """Begin the drain: every child gets SIGTERM, and run() returns once all have ended."""
        self._stopping.set()

    async def run(self) -> int:
        """Start the children and keep them running until stop() (or SIGTERM/SIGINT); return the exit code:
        0 when every child drained cleanly, a failed first start's own code, otherwise 1."""
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop)
        try:
            codes = await asyncio.gather(*(self._keep(child) for child in self._children))
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
        if self._failed_code is not None:
            return self._failed_code
        return 0 if all(code == 0 for code in codes) else 1

    async def _keep(self, child: _Child) -> int:
        """Run one child until the drain, restarting it whenever it dies before; return its last exit code."""
        code = 0
        while not self._stopping.is_set():
            read_fd, write_fd = os.pipe()
            try:
                process = child.process = await asyncio.create_subprocess_exec(
                    *self._command(child.number), env={**self._environment(child.number), READY_FD: str(write_fd)},
                    pass_fds=(write_fd,))
            except BaseException:
                os.close(read_fd)
                raise
            finally:
                os.close(write_fd)
            child.started, child.starts = self._clock(), child.starts + 1
            ready = asyncio.create_task(_reported(read_fd))
            exited = asyncio.create_task(process.wait())
            stopping = asyncio.create_task(self._stopping.wait())
            await asyncio.wait((exited, stopping), return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not exited.done():
                code = await self._drain(process, exited)
                await ready
                return code
            code = exited.result()
            child.served = await ready or child.served  # the pipe is closed once the child has ended
            if self._stopping.is_set():
                return code
            lived = self._clock() - child.started
            if not child.served:
                # It never served: the same settings would fail again. Stop everything.
                log.error("worker %d could not start (exit code %d): stopping every worker", child.number, code)
                self._failed_code = code
                self._stopping.set()
                return code
            stable = lived >= STABLE_AFTER
            child.backoff = FIRST_BACKOFF if stable else min(child.backoff * 2, MAX_BACKOFF)
            delay = 0.0 if stable else child.backoff
            log.error("worker %d (pid %d) exited with code %d after %.1f s: restarting it%s", child.number,
                      process.pid, code, lived, f" in {delay:.1f} s" if delay else "")
            self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        return code

    async def _drain(self, process: asyncio.subprocess.Process, exited: asyncio.Task[int]) -> int:
        """SIGTERM a child and wait SHUTDOWN_GRACE and a margin for it, then SIGKILL it."""
        process.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(asyncio.shield(exited), timeout=self._grace + self._kill_margin)
        except TimeoutError:
            log.error("worker pid %d did not stop within SHUTDOWN_GRACE + %.0f s: killing it", process.pid,
                      self._kill_margin)
            process.kill()
            await exited
            return 1
