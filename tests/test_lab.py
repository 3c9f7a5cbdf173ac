"""JupyterLab in a real browser: ./lab.sh serves the notebooks, headless Chromium (Debian's package, driven
by Playwright) opens notebooks/01_data.py by double click, runs all cells and finds its figure.

Skips where Chromium or Playwright is absent, unless PAPER_REQUIRE_BROWSER=1 (set by .ci/run): then it fails.
"""
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import jupytext
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("PAPER_CHROMIUM", "/usr/bin/chromium")
# Chromium from Debian, headless, talking to nothing but the local server; a fresh profile per test.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e .[dev])"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is absent (apt-get install chromium)"
    return None


def _require_browser():
    why = _missing_browser()
    if why:
        if os.environ.get("PAPER_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PAPER_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs_mentioning(marker: str) -> list[int]:
    """PIDs whose command line mentions marker (the test's tmp dir: server, kernels)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if marker in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def lab(tmp_path):
    """./lab.sh on 127.0.0.1 with a free port and a token; its state, runtime files (kernel connection files)
    and outputs in tmp_path. Stopped, kernels included, whatever happens in the test."""
    _require_browser()
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, "PAPER_PYTHON": os.environ.get("PAPER_PYTHON", sys.executable),
           "PAPER_LAB_DIR": str(tmp_path / "lab"), "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "PAPER_LAB_ROOT": str(tmp_path / "root")}
    # the lab serves a copy of notebooks/ and jupytext.toml: an autosave must not touch the repo's sources
    shutil.copytree(ROOT / "notebooks", tmp_path / "root" / "notebooks", ignore=shutil.ignore_patterns("*.ipynb"))
    shutil.copy(ROOT / "jupytext.toml", tmp_path / "root")
    log = open(tmp_path / "lab.log", "w")
    proc = subprocess.Popen(
        [str(ROOT / "lab.sh"), "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start; see {tmp_path / 'lab.log'}:\n"
                                + (tmp_path / "lab.log").read_text()[-2000:])
                time.sleep(0.5)
        yield url, token
    finally:
        # SIGTERM: jupyter_server shuts its kernels down; then anything left that names our tmp dir
        # (a kernel started in its own session) is killed.
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        deadline = time.monotonic() + 10
        while (left := _procs_mentioning(str(tmp_path))) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not left, f"processes left behind by JupyterLab: {left}"


def test_01_data_runs_in_jupyterlab(lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    url, token = lab
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(60_000)
            page.goto(f"{url}/lab/tree/notebooks?token={token}")
            # a double click in the file browser opens the .py as a notebook (jupytext, default viewer)
            page.locator(".jp-DirListing-item", has_text="01_data.py").dblclick()
            notebook = page.locator(".jp-NotebookPanel:visible")
            expect(notebook.locator(".jp-Notebook")).to_be_visible()
            # the project kernel starts by itself (no "Select Kernel" dialog); Run All before it is bound would
            # ask for one
            kernel_idle = page.get_by_role("button", name="Python 3 | Idle", exact=True)  # the status bar
            expect(kernel_idle).to_be_visible(timeout=120_000)
            expect(page.locator(".jp-Dialog")).to_have_count(0)
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile("^Run$")).click()
            page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()  # Run > Run All Cells
            # done when the last cell printed its line and the kernel is idle again
            expect(notebook.locator(".jp-OutputArea-output", has_text="all checks passed")).to_be_visible(timeout=300_000)
            expect(kernel_idle).to_be_visible(timeout=60_000)
            page.screenshot(path=str(tmp_path / "lab_01_data.png"), full_page=True)

            # textContent, not innerText: cells scrolled out of view are not laid out
            text_of = "els => els.map(e => e.textContent)"
            prompts = notebook.locator(".jp-CodeCell .jp-InputPrompt").evaluate_all(text_of)
            # Run All stops at an error, which leaves the cells after it without an execution count
            n_code = sum(c.cell_type == "code" for c in jupytext.read(ROOT / "notebooks" / "01_data.py").cells)
            assert len(prompts) == n_code and all(re.fullmatch(r"\[\d+\]:", p.strip()) for p in prompts), prompts
            outputs = "\n".join(notebook.locator(".jp-OutputArea-output").evaluate_all(text_of))
            assert "Traceback" not in outputs and not re.search(r"^\w*(Error|Exception)\b", outputs, re.M), outputs[-2000:]
            figure = notebook.locator(".jp-OutputArea-output img[src^='data:image/png']")
            expect(figure.first).to_be_visible()
            assert figure.first.evaluate("img => img.naturalWidth") > 100
            # saving writes the inputs back into the .py, never the outputs: the source stays as it was
            page.keyboard.press("Control+s")
            expect(page.locator(".jp-mod-dirty")).to_have_count(0)
            saved = (tmp_path / "root" / "notebooks" / "01_data.py").read_text()
            assert saved == (ROOT / "notebooks" / "01_data.py").read_text()
        finally:
            browser.close()
