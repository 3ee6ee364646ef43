"""A page opened in a real headless Chromium, seen the way a user sees it (for the report tests).

Drives Debian's ``chromium`` over the DevTools protocol with aiohttp's websocket client:
opens a file, collects console errors and uncaught exceptions, evaluates a script in the
page (what is visible, element sizes), and saves a full-page screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "/usr/bin/chromium"
"""Debian's package puts the browser here (``make chromium`` installs it)."""

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)
"""Offline and quiet: no sync, no updates, no network of its own."""


def chromium_path() -> str | None:
    """The browser's path, or None when it is not installed."""
    return CHROMIUM if Path(CHROMIUM).is_file() else shutil.which("chromium")


class PageView:
    """What a headless Chromium showed for one page: console errors, script results, a screenshot."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        """Console errors, uncaught exceptions and failed loads, as text."""
        self.facts: Any = None
        """What the probe script returned (JSON values)."""


async def _session(ws_url: str, page: Path, probe: str, screenshot: Path, width: int) -> PageView:
    view = PageView()
    ids = iter(range(1, 1_000_000))
    async with aiohttp.ClientSession() as http, http.ws_connect(ws_url, max_msg_size=0) as ws:
        pending: dict[int, asyncio.Future[Any]] = {}
        loaded = asyncio.Event()

        async def reader() -> None:
            async for msg in ws:
                data = json.loads(msg.data)
                if "id" in data and data["id"] in pending:
                    pending.pop(data["id"]).set_result(data)
                method, params = data.get("method"), data.get("params", {})
                if method == "Page.loadEventFired":
                    loaded.set()
                elif method == "Runtime.exceptionThrown":
                    view.errors.append(json.dumps(params.get("exceptionDetails", {}))[:500])
                elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                    view.errors.append(json.dumps(params.get("args", []))[:500])
                elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                    view.errors.append(str(params["entry"].get("text")))

        async def call(method: str, **params: Any) -> Any:
            msg_id = next(ids)
            pending[msg_id] = asyncio.get_running_loop().create_future()
            await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
            reply = await asyncio.wait_for(pending[msg_id], 30)
            if "error" in reply:
                raise RuntimeError(f"{method}: {reply['error']}")
            return reply.get("result", {})

        task = asyncio.create_task(reader())
        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable")
        await call("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
        await call("Page.navigate", url=page.resolve().as_uri())
        await asyncio.wait_for(loaded.wait(), 30)
        result = await call("Runtime.evaluate", expression=probe, returnByValue=True)
        view.facts = result.get("result", {}).get("value")
        height = await call("Runtime.evaluate", expression="document.documentElement.scrollHeight", returnByValue=True)
        full = int(height["result"]["value"])
        await call("Emulation.setDeviceMetricsOverride", width=width, height=full, deviceScaleFactor=1, mobile=False)
        shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        task.cancel()
    return view


def open_page(page: Path, probe: str, screenshot: Path, *, width: int = 1100, timeout_s: float = 60.0) -> PageView:
    """Open ``page`` in a fresh headless Chromium, run ``probe`` in it, save a full-page screenshot.

    Args:
        page: The HTML file.
        probe: A JavaScript expression whose (JSON) value is returned as ``facts``.
        screenshot: Where the PNG goes.
        width: The window's width in CSS pixels.
        timeout_s: How long the browser may take to start.

    Returns:
        The console errors seen and what ``probe`` returned.
    """
    binary = chromium_path()
    if binary is None:
        raise FileNotFoundError("chromium is not installed: run `make chromium` (apt-get install chromium)")
    # Chromium's helper processes may still write into the profile as it is removed (seen in CI
    # as "Directory not empty: 'Default'"): the whole process group is stopped, and a leftover
    # file of a throwaway profile is no reason to fail a test.
    with tempfile.TemporaryDirectory(prefix="echo-chromium-", ignore_cleanup_errors=True) as profile:
        proc = subprocess.Popen(
            [binary, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout_s
            while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"chromium did not start (exit {proc.poll()})")
                time.sleep(0.1)
            port = port_file.read_text().splitlines()[0]
            return asyncio.run(_open(port, page, probe, screenshot, width))
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """Stop Chromium and every helper process it started (they share its session's group)."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait_s)
        except subprocess.TimeoutExpired:
            continue
        # The browser is gone; give its helpers a moment to follow it out.
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


async def _open(port: str, page: Path, probe: str, screenshot: Path, width: int) -> PageView:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/json/list") as resp:
        targets = await resp.json(content_type=None)
    ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
    return await _session(ws_url, page, probe, screenshot, width)
