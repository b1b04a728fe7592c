"""A real `titans serve` (uvicorn) process on a free port, and an SSE reader for its streams."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.redis_server import free_port

ROOT = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, model_dir: Path | None, store: str | None, *args: str, env: dict[str, str] | None = None,
                 command: list[str] | None = None, port: int | None = None, clean_env: bool = False):
        """`titans serve` with these options, or `command` (which must listen on `port`)."""
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = command or [sys.executable, "-m", "titans", "serve", "--model", str(model_dir), "--store",
                               store, "--port", str(self.port), "--log-level", "warning", *args]
        self.env = {**({} if clean_env else os.environ), "OMP_NUM_THREADS": "1", **(env or {})}
        self.process: subprocess.Popen | None = None
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"titans-serve-{self.port}.log"

    def start(self, timeout: float = 60) -> ServerProcess:
        self.log = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log_path.read_text()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "log", None):
            self.log.close()

    def engine_pid(self) -> int | None:
        """The pid of the server's engine process (its child that multiprocessing spawned, from whichever thread),
        or None while it has none (a new one starting)."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                cmdline = (stat.parent / "cmdline").read_bytes()
                if int(fields[1]) == self.process.pid and b"spawn_main" in cmdline and \
                        b"resource_tracker" not in cmdline:
                    return int(stat.parent.name)
        return None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def sse_events(raw: bytes) -> list:
    """Parse an SSE body strictly: every event is one `data: ...` line followed by a blank line."""
    text = raw.decode()
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: ") and "\n" not in block, repr(block)
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
