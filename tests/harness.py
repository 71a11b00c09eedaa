"""A real `emu3 serve` process for the tests, the serving benchmark and the screenshots script: a free local
port, the child process, and waiting until it answers."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it; another process could take it before we bind)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`emu3 serve ARGS` in a child process on a free local port; entering waits until /health answers 200.

    For code that needs a real server process (signals, its memory, a browser): the benchmarks, the
    screenshots script and the drain test. Its output goes to a temporary file, returned by `output()`
    and quoted in the error when it exits early or does not answer within `timeout` seconds. Leaving
    the block sends SIGTERM (a drain) and waits for the exit; `proc` is the `subprocess.Popen`.

        with ServerProcess(["--model", "my-model"]) as server:
            httpx.get(server.url + "/health")
    """

    def __init__(self, args: list[str] | tuple[str, ...] = (), timeout: float = 120.0, host: str = "127.0.0.1"):
        self.args, self.timeout, self.host = list(args), timeout, host
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.proc, self._log, self._final = None, None, ""

    def output(self) -> str:
        """Everything the server has printed so far (after the block: all it printed)."""
        if self._log is None or self._log.closed:
            return self._final
        self._log.flush()
        return Path(self._log.name).read_text(errors="replace")

    def __enter__(self) -> ServerProcess:
        import os
        import subprocess
        import sys
        import urllib.error
        import urllib.request

        self._log = tempfile.NamedTemporaryFile("w+", prefix="emu3-serve-", suffix=".log")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emu3.cli", "serve", "--host", self.host, "--port", str(self.port), *self.args],
            stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            why = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None else
                   f"did not answer {self.url}/health within {self.timeout:g} s" if time.monotonic() > deadline else "")
            if why:
                out = self.output()[-4000:]
                self.__exit__(None, None, None)
                raise RuntimeError(f"emu3 serve {' '.join(self.args)} {why}; its output:\n{out}")
            time.sleep(0.1)

    def __exit__(self, *exc) -> None:
        import subprocess

        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None and not self._log.closed:
            self._final = self.output()
            self._log.close()
