"""Headless Chromium from Debian, driven by Playwright (it cannot download its own browser here)."""

import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

# Playwright's sync API runs an event loop in the test thread; the test's own database work is
# still synchronous, so Django's async-safety guard has to be told.
os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def pytest_collection_modifyitems(items):
    for item in items:
        if "tests/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    return {
        **browser_type_launch_args,
        "executable_path": CHROMIUM,
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"],
    }


@pytest.fixture
def portal_server(transactional_db):
    """The portal as production serves it: portal.asgi under uvicorn (pages and API through Django's
    WSGI handler, the gateway under /v1/)."""
    from portal.asgi import application
    from tests.gateway.conftest import close_server_connections
    from tests.support.fake_upstream import ServerThread

    with ServerThread(application) as thread:
        yield SimpleNamespace(url=thread.url)
    close_server_connections()


@pytest.fixture
def log_in(page, portal_server):
    """Log in through the real login form."""

    def _log_in(email, password):
        page.goto(f"{portal_server.url}/accounts/login/")
        page.fill("input[name=login]", email)
        page.fill("input[name=password]", password)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        return page

    return _log_in


# Screenshots of the main pages, for a reviewer to look at after a run (git-ignored; listed at the end).
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS_DIR", Path(__file__).resolve().parents[2] / "test-artifacts"))
_SAVED: list[Path] = []


@pytest.fixture
def screenshot():
    """screenshot(page, name): a full-page PNG in the artifacts folder, named for the test run."""

    def _shot(page, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}.png"
        page.screenshot(path=str(path), full_page=True)
        _SAVED.append(path)
        return path

    return _shot


def pytest_terminal_summary(terminalreporter):
    if _SAVED:
        terminalreporter.write_sep("-", f"{len(_SAVED)} screenshots in {ARTIFACTS}")
        for path in _SAVED:
            terminalreporter.write_line(str(path))
