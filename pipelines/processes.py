"""Process hygiene for `vaeflow run`: SIGTERM ends a run like Ctrl-C, and Prefect's temporary server never
outlives the process that started it, not even after kill -9.

Prefect starts its temporary server as a child process and stops it at interpreter exit; a SIGTERM (default
action: die at once) or a SIGKILL skips that and orphans the server. So SIGTERM is turned into
KeyboardInterrupt (the stages end their MLflow runs KILLED and Python exits normally), and a small watchdog
process stops the server when its owner is gone, however it died.

    python -m vaeflow.pipelines.processes OWNER_PID SERVER_PID   # the watchdog (started by temporary_server)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt in the main thread, as Ctrl-C does."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def temporary_server() -> Iterator[str | None]:
    """Without PREFECT_API_URL: start Prefect's temporary server now (with the configured start-up timeout), guarded
    by a watchdog; yields its API URL. With PREFECT_API_URL: nothing to start, yields None."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    if PREFECT_API_URL.value():
        yield None
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the instance Prefect's own clients use when no API URL is set
    server.start(timeout=PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    # Prefect stops the server at interpreter exit, after its log and event workers have flushed (atexit runs
    # last-registered first); the watchdog covers the deaths that skip atexit, and then exits by itself
    subprocess.Popen([sys.executable, "-m", "vaeflow.pipelines.processes", str(os.getpid()), str(server.server_process.pid)],
                     start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
    yield server.api_url


def end_with_parent(poll: float = 1.0) -> None:
    """In a flow run started by a Prefect worker or `vaeflow serve` (PREFECT__FLOW_RUN_ID is set): SIGTERM this
    process when its parent dies, kill -9 included, so that Prefect reports the run Crashed and the stages end their
    MLflow runs KILLED, instead of an orphan training on unseen. A no-op in `vaeflow run`, which must outlive its shell
    under nohup. A thread polls getppid(): PR_SET_PDEATHSIG would follow the parent's thread, not its process."""
    import threading

    if not os.environ.get("PREFECT__FLOW_RUN_ID") or getattr(end_with_parent, "started", False):
        return
    parent = os.getppid()

    def check() -> None:
        while os.getppid() == parent:
            time.sleep(poll)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=check, name="vaeflow-parent-watch", daemon=True).start()
    end_with_parent.started = True


FAILPOINT = "VAEFLOW_FAILPOINT"  # tests: NAME (die there with SIGKILL) or NAME:stop (pause there with SIGSTOP)


def failpoint(name: str) -> None:
    """Die at once (SIGKILL, no cleanup) when VAEFLOW_FAILPOINT names this point, or pause (SIGSTOP, until a
    SIGCONT, once) when it names NAME:stop: how the crash tests stop a run at an exact place, e.g. between registering
    a version and setting its aliases, or between two epochs, where no store transaction is open."""
    wanted = os.environ.get(FAILPOINT)
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:stop":
        del os.environ[FAILPOINT]  # once: the run goes on after the SIGCONT
        os.kill(os.getpid(), signal.SIGSTOP)


def alive(pid: int) -> bool:
    """Whether process pid exists (and is not a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def watch(owner: int, child: int, poll: float = 0.5) -> None:
    """Wait until owner or child is gone; if the owner went first, stop the child (SIGTERM, then SIGKILL)."""
    while alive(child):
        if not alive(owner):
            try:
                os.kill(child, signal.SIGTERM)
                deadline = time.monotonic() + 10
                while alive(child) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if alive(child):
                    os.kill(child, signal.SIGKILL)
            except ProcessLookupError:  # it ended by itself meanwhile
                pass
            return
        time.sleep(poll)


if __name__ == "__main__":
    watch(int(sys.argv[1]), int(sys.argv[2]))
