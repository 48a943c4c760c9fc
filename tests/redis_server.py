"""A private redis-server process for tests (Debian's redis-server; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pytest

redis = pytest.importorskip("redis")
from redis.backoff import NoBackoff  # noqa: E402
from redis.retry import Retry  # noqa: E402

REDIS_SERVER = shutil.which("redis-server")


def _need_server() -> None:
    if REDIS_SERVER is None:
        why = "no redis-server (apt-get install redis-server; .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(why)                  # CI installs it: missing there is a broken setup, not a skip
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A private redis-server process the test may stop, restart, slow down or wipe."""

    def __init__(self, tmp, *args: str):
        _need_server()
        self.port, self.dir, self.args, self.proc = _free_port(), tmp, args, None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kw):
        """A client that does not retry (redis-py's default would wait out a stalled server)."""
        return redis.Redis(host="127.0.0.1", port=self.port, retry=Retry(NoBackoff(), 0), **kw)

    def start(self) -> None:
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.dir),
                                      "--enable-debug-command", "local", *self.args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:                                      # wait until it answers
            try:
                self.client().ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} did not start") from None
                time.sleep(0.01)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def live_url(tmp) -> tuple[str, "RedisServer | None"]:
    """The Redis .ci/run started (TIERLM_TEST_REDIS), emptied, or else a private server (to stop)."""
    url = os.environ.get("TIERLM_TEST_REDIS")
    if url:
        c = redis.Redis.from_url(url)
        c.flushdb()
        c.close()
        return url, None
    server = RedisServer(tmp)
    return server.url, server
