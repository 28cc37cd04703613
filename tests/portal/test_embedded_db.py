"""The embedded default database (portal/embedded_db.py), each case in processes of its own on a
data folder of its own: the first process initialises and starts the server, later ones join it,
the last one out has it stopped (by the watcher), the data stays for the next start, and a crash
(kill -9 of every process, the server's too) is recovered from by the next start without a manual
step.
"""

import contextlib
import subprocess
import sys
from pathlib import Path

import psutil

from tests.support.services import postgres_processes, wait_for_postgres_to_stop

PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Prints the server's version and the marks left by earlier runs, adds one, and then (with
# `hold`) stays until its standard input is closed.
USE_SERVER = """
import sys
from pathlib import Path
import psycopg
from portal import embedded_db
with psycopg.connect(embedded_db.database_url(Path(sys.argv[1])), autocommit=True) as conn:
    conn.execute("CREATE TABLE IF NOT EXISTS marks (label text)")
    marks = [row[0] for row in conn.execute("SELECT label FROM marks ORDER BY label")]
    conn.execute("INSERT INTO marks VALUES (%s)", [sys.argv[2]])
    print(f"{conn.info.server_version // 10000} marks:{','.join(marks)}", flush=True)
if sys.argv[3:] == ["hold"]:
    sys.stdin.read()
"""


def use_server(data_dir: Path, mark: str) -> str:
    result = subprocess.run([sys.executable, "-c", USE_SERVER, str(data_dir), mark], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


class Holder:
    """A process that uses the server until it is told to exit (or is killed)."""

    def __init__(self, data_dir: Path, mark: str):
        self.process = subprocess.Popen([sys.executable, "-c", USE_SERVER, str(data_dir), mark, "hold"],
                                        cwd=PROJECT_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline(), "the holding process did not reach the server"

    def exit(self) -> None:
        self.process.stdin.close()
        assert self.process.wait(timeout=60) == 0


def postmaster_pid(data_dir: Path) -> int:
    pid = int((data_dir / "postmaster.pid").read_text().split()[0])
    assert pid in {process.pid for process in postgres_processes(data_dir)}, "the server is not running"
    return pid


def kill_everything(holder: Holder, data_dir: Path) -> None:
    victims = postgres_processes(data_dir)
    assert victims, "no server is running"
    for process in victims:  # first, or the watcher would stop the server cleanly once the holder is gone
        with contextlib.suppress(psutil.NoSuchProcess, ProcessLookupError):  # a child gone with the postmaster
            process.kill()
    holder.process.kill()
    holder.process.wait()
    assert wait_for_postgres_to_stop(data_dir)


def test_the_first_use_starts_postgresql_and_the_last_process_out_stops_it(embedded_db_dir):
    assert use_server(embedded_db_dir, "first") == "18 marks:"
    assert (embedded_db_dir / "PG_VERSION").read_text().strip() == "18"
    assert wait_for_postgres_to_stop(embedded_db_dir)
    assert not (embedded_db_dir / "postmaster.pid").exists()


def test_the_next_start_reuses_the_data(embedded_db_dir):
    use_server(embedded_db_dir, "first")
    assert use_server(embedded_db_dir, "second") == "18 marks:first"
    assert wait_for_postgres_to_stop(embedded_db_dir)


def test_a_process_joins_the_running_server_and_leaving_does_not_stop_it_under_another(embedded_db_dir):
    holder = Holder(embedded_db_dir, "holder")
    postmaster = postmaster_pid(embedded_db_dir)

    assert use_server(embedded_db_dir, "visitor") == "18 marks:holder"
    assert postmaster_pid(embedded_db_dir) == postmaster  # the same server, still up

    holder.exit()
    assert wait_for_postgres_to_stop(embedded_db_dir)


def test_after_everything_was_killed_the_next_start_recovers_and_stops_on_exit(embedded_db_dir):
    holder = Holder(embedded_db_dir, "crashed")
    kill_everything(holder, embedded_db_dir)
    assert (embedded_db_dir / "postmaster.pid").exists()

    assert use_server(embedded_db_dir, "after") == "18 marks:crashed"
    assert wait_for_postgres_to_stop(embedded_db_dir)  # the killed process is not counted as a user


def test_a_stale_postmaster_pid_naming_another_live_process_does_not_block_the_start(embedded_db_dir):
    """After a machine restart the number in postmaster.pid may belong to some other process;
    PostgreSQL alone would refuse to start then."""
    holder = Holder(embedded_db_dir, "crashed")
    kill_everything(holder, embedded_db_dir)
    with subprocess.Popen(["sleep", "120"]) as stranger:
        pid_file = embedded_db_dir / "postmaster.pid"
        pid_file.write_text("\n".join([str(stranger.pid), *pid_file.read_text().splitlines()[1:]]) + "\n")

        assert use_server(embedded_db_dir, "after") == "18 marks:crashed"
        assert wait_for_postgres_to_stop(embedded_db_dir)
        assert stranger.poll() is None  # left alone
        stranger.kill()
