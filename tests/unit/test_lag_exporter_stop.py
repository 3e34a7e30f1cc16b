"""The lag exporter ends on SIGTERM at once, cleanly (exit 0), even in a poll that waits for
a broker away. In its container it is PID 1, for which the kernel drops a signal with no
handler: a rollout waited out the grace period and killed it. Here it is an ordinary
process, which SIGTERM killed without its clean-up (exit -15) before it had a handler."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from transport.local import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_ends_the_lag_exporter_at_once_and_cleanly(tmp_path: Path) -> None:
    port = free_port()
    exporter = subprocess.Popen(
        [sys.executable, "-m", "portal_sync", "lag-exporter", "--port", str(port),
         "--bootstrap", f"127.0.0.1:{free_port()}",  # nobody listens: the poll waits
         "--store", f"sqlite:///{tmp_path / 'store.db'}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # its HTTP server answers: it runs, and polls
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert exporter.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
        time.sleep(1)  # inside a poll that waits for the broker
        exporter.send_signal(signal.SIGTERM)
        output, _ = exporter.communicate(timeout=15)
    finally:
        if exporter.poll() is None:
            exporter.kill()
    assert exporter.returncode == 0, output
    assert "lag exporter stopped" in output
