"""A real llama-server for a test: started on loopback, waited for until /health answers, stopped after."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

from agentd.testing.localcluster import free_port


@contextlib.contextmanager
def healthy_llama_server(binary: str | Path, model: str | Path, args: Sequence[str], log: Path,
                         timeout: float = 120.0) -> Iterator[int]:
    """`binary -m model args` on 127.0.0.1, its output in `log`; yields its port once /health says 200.

    The test fails with the log's tail if the server exits first or is not healthy within `timeout`."""
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen([str(binary), "-m", str(model), *args, "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, (f"llama-server exited {proc.returncode}: "
                                         f"{log.read_text(errors='replace')[-1500:]}")
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    break
            assert time.monotonic() < deadline, (f"llama-server not healthy in {timeout:.0f} s: "
                                                 f"{log.read_text(errors='replace')[-1500:]}")
            time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
