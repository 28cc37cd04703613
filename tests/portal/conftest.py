import shutil
import tempfile
from pathlib import Path

import pytest

from tests.support.services import postgres_processes, wait_for_postgres_to_stop


@pytest.fixture
def embedded_db_dir():
    """A data folder for the embedded PostgreSQL of its own, not under pytest's tmp_path: under
    root the server runs as another user, and each pytest session that starts on the machine
    takes others' access to /tmp/pytest-of-root away again."""
    folder = Path(tempfile.mkdtemp(prefix="portal-embedded-db-"))
    yield folder / "postgres"
    if not wait_for_postgres_to_stop(folder / "postgres"):  # a failed test's server
        for process in postgres_processes(folder / "postgres"):
            process.kill()
    shutil.rmtree(folder)
