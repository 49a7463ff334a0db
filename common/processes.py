"""Starting and ending Flower's processes (SuperLink, SuperNode, ``flwr run``).

Flower starts its helpers (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``)
by bare name, so a command called by absolute path from a venv that is not activated
would fail: :func:`flower_env` puts this interpreter's ``bin`` folder first on ``PATH``.
Every process runs in its own session so that :meth:`Managed.stop` ends it with all its
children by process group, first politely (SIGTERM), then for sure (SIGKILL).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


class LaunchError(RuntimeError):
    """A Flower process could not be started or did not come up."""


def bin_dir() -> Path:
    return Path(sys.executable).parent


def flower_env(flwr_home: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(bin_dir()), env.get("PATH", "")])
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.update(extra)
    return env


def executable(name: str) -> str:
    """The path of a Flower command installed beside this interpreter (or on PATH)."""
    local = bin_dir() / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise LaunchError(f"{name} is not installed (pip install 'flwr[simulation]==1.42.*')")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from ``/proc``; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Managed:
    """One child process in its own session (so its children end with it)."""

    def __init__(
        self,
        cmd: list[str],
        env: dict[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.cmd = cmd
        self.log_path = log_path
        self._log = open(log_path, "ab") if log_path else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd,
                stdout=self._log if self._log else subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as err:
            raise LaunchError(f"cannot start {cmd[0]}: {err}") from err

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_port(self, host: str, port: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(host, port):
            if not self.alive():
                raise LaunchError(f"{Path(self.cmd[0]).name} exited early{self._tail()}")
            if time.monotonic() > deadline:
                raise LaunchError(f"{Path(self.cmd[0]).name} did not open {host}:{port}")
            time.sleep(0.2)

    def _tail(self) -> str:
        if self.log_path and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").strip().splitlines()[-15:]
            return ":\n  " + "\n  ".join(lines)
        return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM the process group, SIGKILL what is left after ``timeout``; returns rc."""
        # Flower detaches some helpers into sessions of their own: find them first
        family = descendants(self.proc.pid)
        if self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # children may outlive the leader: end the whole group in any case
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for pid in family:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        if self._log:
            self._log.close()
        return self.proc.returncode
