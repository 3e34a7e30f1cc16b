"""A real Prometheus (Debian's package) on loopback for the integration tests."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from transport.local import free_port


class PrometheusUnavailable(RuntimeError):
    pass


class Prometheus:
    def __init__(
        self,
        workdir: Path,
        jobs: dict[str, int],
        rules: dict[str, Any],
        scrape: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        """`scrape`: more options of some jobs (`scheme`, `tls_config`, `basic_auth`)."""
        binary = shutil.which("prometheus")
        if binary is None:
            raise PrometheusUnavailable("no prometheus binary (Debian package `prometheus`)")
        self.port = free_port()
        (workdir / "alerts.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
                | (scrape or {}).get(job, {})
                for job, port in jobs.items()
            ],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        self.log = (workdir / "prometheus.log").open("wb")
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self._wait_ready()

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise PrometheusUnavailable(f"prometheus exited ({self.process.returncode})")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1)
                return
            except OSError:
                time.sleep(0.2)
        raise PrometheusUnavailable("prometheus did not become ready")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = urllib.request.urlopen(url, timeout=10).read()
        except urllib.error.HTTPError as error:  # a bad query answers 400 with the reason
            body = error.read()
        answer = json.loads(body)
        if answer.get("status") != "success":
            raise AssertionError(f"{path} {params}: {answer.get('error')}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self.api("query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    def firing(self) -> set[str]:
        alerts = self.api("alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.close()
