"""A Flower federation on this machine, on the deployment engine, safely: one SuperLink and N
SuperNodes on 127.0.0.1 (free ports), and ``flwr run`` to submit an app to it.

Every process gets ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1`` and
``FLWR_HOME`` in the federation's own folder (its ``config.toml`` names only this SuperLink,
``insecure``); the SuperLink runs with ``--insecure --disable-runtime-dependency-installation``
and its in-memory state (``database=`` names a SQLite file instead: measured, 16 SuperNodes
replying at once then lose replies to "database is locked" errors and the round stalls);
SuperNodes do not install dependencies either (their default).  No
Ray, no simulation engine: nothing leaves the machine.  :meth:`LocalFederation.stop` (also on
``__exit__``, whatever happened) ends each process it started by its own id -- its process
group, and every descendant found under it (the ServerApp / ClientApp processes Flower spawns)
-- and waits for them::

    with LocalFederation(3, workdir, node_config=lambda i: {"partition-id": i,
                                                            "num-partitions": 3}) as fed:
        results = fed.run("examples/flower_app", {"dataset": "digits"},
                          results=workdir / "out" / "results.json", timeout=300)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from ..errors import FxFuseError

__all__ = ["SAFE_ENV", "FederationError", "LocalFederation", "free_port", "run_config_arg"]

SAFE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
CONNECTION = "fxfuse-local"
_STATUS_EVERY_S = 5.0  # how often run() asks the SuperLink whether the run has finished


class FederationError(FxFuseError):
    """The local federation did not start, or a run did not finish (logs quoted)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``key=value`` pairs for ``flwr run --run-config`` (TOML values: strings quoted)."""
    return " ".join(f"{k}={json.dumps(v)}" for k, v in values.items())


def _descendants(pid: int) -> list[int]:
    """Every live process under ``pid`` (by parent links in /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out: list[int] = []
    todo = [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _stat(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _ident(pid: int) -> tuple[int, str] | None:
    """``(pid, start time)``: a process, not just a number the system may reuse."""
    fields = _stat(pid)
    return None if fields is None else (pid, fields[19])


def _alive(ident: tuple[int, str]) -> bool:
    fields = _stat(ident[0])
    return fields is not None and fields[0] != "Z" and fields[19] == ident[1]


class LocalFederation:
    """``n_nodes`` SuperNodes and their SuperLink on 127.0.0.1 (module doc); ``node_config(i)``
    gives node ``i``'s ``--node-config`` values (default: partition-id / num-partitions)."""

    def __init__(self, n_nodes: int, workdir: str | Path, *,
                 node_config: Callable[[int], Mapping[str, Any]] | None = None,
                 start_timeout: float = 60.0, database: str | Path | None = None) -> None:
        self.n_nodes = n_nodes
        self.workdir = Path(workdir).resolve()
        self.home = self.workdir / "flwr-home"
        self.node_config = node_config or (lambda i: {"partition-id": i,
                                                      "num-partitions": n_nodes})
        self.start_timeout = start_timeout
        self.database = database
        self.port = 0
        self.procs: list[tuple[str, subprocess.Popen[bytes], IO[bytes]]] = []
        self.seen: set[tuple[int, str]] = set()

    # ---- processes ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ, **SAFE_ENV, FLWR_HOME=str(self.home))
        env.pop("RAY_ADDRESS", None)
        return env

    def _exe(self, name: str) -> str:
        here = Path(sys.executable).with_name(name)
        found = str(here) if here.exists() else shutil.which(name)
        if found is None:
            raise FederationError(f"{name} is not installed; pip install 'fxfuse[flower]'")
        return found

    def _spawn(self, label: str, args: list[str]) -> None:
        log = open(self.workdir / f"{label}.log", "wb")  # noqa: SIM115 - closed in stop()
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=self.env(),
                                cwd=self.workdir, start_new_session=True)
        self.procs.append((label, proc, log))

    def start(self) -> LocalFederation:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.port}"\ninsecure = true\n')
        try:
            self._spawn("superlink", [
                self._exe("flower-superlink"), "--insecure",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(self.port),
                *([] if self.database is None else ["--database", str(self.database)])])
            self._wait_listening(self.port, "superlink")
            for i in range(self.n_nodes):
                self._spawn(f"supernode-{i}", [
                    self._exe("flower-supernode"), "--insecure", "--superlink",
                    f"127.0.0.1:{self.port}", "--host", "127.0.0.1", "--port", str(free_port()),
                    "--node-config", run_config_arg(self.node_config(i))])
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, port: int, label: str) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            self._check_alive()
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.2)
        raise FederationError(f"{label} did not listen on 127.0.0.1:{port} within "
                              f"{self.start_timeout:.0f} s{self.logs()}")

    def _check_alive(self) -> None:
        for label, proc, _ in self.procs:
            if proc.poll() is not None:
                raise FederationError(f"{label} exited with code {proc.returncode}{self.logs()}")

    def logs(self, tail: int = 1500) -> str:
        parts = []
        for label, _, _ in self.procs:
            path = self.workdir / f"{label}.log"
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"\n--- {label} (last {tail} chars) ---\n{text[-tail:]}")
        return "".join(parts)

    def _remember(self) -> None:
        for _, proc, _ in self.procs:
            for pid in [proc.pid, *_descendants(proc.pid)]:
                ident = _ident(pid)
                if ident is not None:
                    self.seen.add(ident)

    def pids(self) -> list[int]:
        """The live processes of this federation: those started and their descendants (every
        one seen so far, also those that left their parent's session)."""
        self._remember()
        return sorted(i[0] for i in self.seen if _alive(i))

    def run(self, app: str | Path, run_config: Mapping[str, Any], *, results: str | Path,
            timeout: float = 600.0) -> dict[str, Any]:
        """Submit ``app`` (a Flower app folder) with ``run_config`` overrides, wait until the
        ServerApp has written the JSON file ``results``, and return it; FederationError (with
        the logs) if a process dies, the run finishes without writing ``results`` (its status
        and the ServerApp's exception quoted) or ``timeout`` seconds pass first."""
        target = Path(results)
        deadline = time.monotonic() + timeout
        sub = subprocess.run([self._exe("flwr"), "run", str(Path(app).resolve()), CONNECTION,
                              "--run-config", run_config_arg(run_config)],
                             env=self.env(), cwd=self.workdir, capture_output=True, text=True,
                             timeout=max(1.0, timeout))
        if sub.returncode != 0:
            raise FederationError(f"flwr run failed ({sub.returncode}): "
                                  f"{sub.stdout[-1500:]}{sub.stderr[-1500:]}{self.logs()}")
        started = re.search(r"started run (\d+)", sub.stdout)
        run_id = started.group(1) if started else None
        next_status = time.monotonic() + _STATUS_EVERY_S
        finished: tuple[str, str] | None = None
        while True:
            self._remember()  # remember the app processes, to be sure stop() ends them all
            if target.is_file():
                return dict(json.loads(target.read_text()))
            self._check_alive()
            if finished is not None:  # one more look at the file, then say why it is missing
                raise FederationError(f"run {run_id} is {finished[0]} without writing "
                                      f"{target.name}: {finished[1] or 'no details'}"
                                      f"{self.logs()}")
            left = deadline - time.monotonic()
            if left <= 0:
                break
            if run_id is not None and time.monotonic() >= next_status:
                finished = self._finished(run_id, left)
                next_status = time.monotonic() + _STATUS_EVERY_S
                if finished is not None:
                    time.sleep(1.0)  # the file is written before the run finishes
                    continue
            time.sleep(0.5)
        raise FederationError(f"no {target.name} within {timeout:.0f} s (the ServerApp failed "
                              f"or is still running){self.logs()}")

    def _finished(self, run_id: str, wait: float) -> tuple[str, str] | None:
        """``(status, details)`` of run ``run_id`` once the SuperLink reports it finished
        (``flwr ls``, given at most ``wait`` seconds), else None (also when the status can not
        be read: the timeout decides)."""
        with contextlib.suppress(subprocess.SubprocessError, OSError, ValueError):
            out = subprocess.run([self._exe("flwr"), "ls", CONNECTION, "--run-id", run_id,
                                  "--format", "json"], env=self.env(), cwd=self.workdir,
                                 capture_output=True, text=True, timeout=max(1.0, min(60, wait)))
            listing = json.loads(out.stdout)
            runs = listing.get("runs", []) if isinstance(listing, dict) else []
            for run in runs if isinstance(runs, list) else []:
                if not isinstance(run, dict):
                    continue
                status = str(run.get("status", ""))
                if str(run.get("run-id")) == run_id and status.startswith("finished"):
                    return status, str(run.get("status-details", ""))
        return None

    def stop(self) -> list[int]:
        """End every process of the federation (module doc); the ids still alive afterwards
        (empty when all are gone)."""
        self._remember()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for _, proc, _ in reversed(self.procs):
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)
            for ident in sorted(self.seen):
                if _alive(ident):
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.kill(ident[0], sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(_alive(i) for i in self.seen):
                for _, proc, _ in self.procs:
                    proc.poll()
                time.sleep(0.1)
            if not any(_alive(i) for i in self.seen):
                break
        for _, proc, log in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            log.close()
        return sorted(i[0] for i in self.seen if _alive(i))

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
