"""A minimal W3C WebDriver client for Debian's chromium + chromium-driver.

chromedriver speaks the W3C WebDriver HTTP protocol; the few commands the
HTML report tests need (navigate, execute a script, click, screenshot) are
a dozen lines of urllib, with no driver download and no extra package.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element key
# As root, Chromium needs --no-sandbox; the rest keep it off this machine's
# closed network (without them every start waits on background fetches).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1600,1000"]
INSTALL = "apt-get install chromium chromium-driver (scripts/install.sh does it as root)"


def find_browser() -> tuple[str, str] | str:
    """(chromium, chromedriver) paths, or why they cannot be used."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        missing = [n for n, p in (("chromium", chromium), ("chromedriver", driver)) if not p]
        return f"no {' and no '.join(missing)} on PATH: {INSTALL}"
    return chromium, driver


class WebDriverError(RuntimeError):
    pass


class Browser:
    def __init__(self, chromium: str, driver: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.profile = tempfile.mkdtemp(prefix="kvmtest-chromium-")
        self.proc = subprocess.Popen([driver, f"--port={port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.session = None
        try:
            self._wait_ready()
            caps = {"capabilities": {"alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {"binary": chromium,
                                       "args": [*CHROMIUM_ARGS, f"--user-data-dir={self.profile}"]},
            }}}
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self._call("GET", "/status").get("ready"):
                    return
            except (OSError, WebDriverError):
                pass
            if self.proc.poll() is not None:
                raise WebDriverError(f"chromedriver exited with {self.proc.returncode}")
            time.sleep(0.1)
        raise WebDriverError("chromedriver did not become ready")

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.loads(r.read())["value"]
        except urllib.error.HTTPError as e:
            raise WebDriverError(f"{method} {path}: {e.read().decode(errors='replace')}") from None

    def _s(self, path: str) -> str:
        return f"/session/{self.session}{path}"

    def get(self, url: str) -> None:
        self._call("POST", self._s("/url"), {"url": url})

    def js(self, script: str, *args: Any) -> Any:
        return self._call("POST", self._s("/execute/sync"), {"script": script, "args": list(args)})

    def find(self, css: str) -> str:
        return self._call("POST", self._s("/element"), {"using": "css selector", "value": css})[
            ELEMENT]

    def click(self, css: str) -> None:
        self._call("POST", self._s(f"/element/{self.find(css)}/click"), {})

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self._call("GET", self._s("/screenshot"))))

    def close(self) -> None:
        try:
            if self.session:
                self._call("DELETE", self._s(""))
        except (OSError, WebDriverError):
            pass
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            shutil.rmtree(self.profile, ignore_errors=True)


def artifacts_dir() -> Path:
    """Where test artifacts (screenshots) go: $KVMTEST_TEST_ARTIFACTS or build/."""
    return Path(os.environ.get("KVMTEST_TEST_ARTIFACTS",
                               Path(__file__).resolve().parents[2] / "build" / "test-artifacts"))
