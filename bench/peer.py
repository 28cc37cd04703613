"""The peer in the same run: LiteLLM's proxy, without a database, pointed at the benchmark's own fake
providers (the instant one as `bench-gpt`, the streaming one as `bench-stream`).

It is installed from PyPI (`litellm[proxy]`, at VERSION) into a virtual environment of its own,
var/litellm-VERSION (made on the first run, reused after), and served with its recommended
worker count, one per core. If it cannot be installed or started here, the benchmark says so and
goes on without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.streams import start
from tests.support.fake_upstream import free_port

ROOT = Path(__file__).resolve().parent.parent
VERSION = "1.108.7"
VENV = ROOT / "var" / f"litellm-{VERSION}"
WORKERS = os.cpu_count() or 1
STREAM_MODEL = "bench-stream"
# It refuses to start without one; with no database, the master key is the one key it checks.
MASTER_KEY = "sk-bench-master-000000"


@dataclass
class Peer:
    url: str | None = None
    pid: int | None = None
    why: str = ""  # when there is no url: why it is not running


def install() -> Path | str:
    """The proxy's command, or why there is none."""
    command = VENV / "bin" / "litellm"
    if command.exists():
        return command
    try:
        subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, capture_output=True, text=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", f"litellm[proxy]=={VERSION}"], check=True,
                       capture_output=True, text=True, timeout=900)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as error:
        subprocess.run(["rm", "-rf", str(VENV)], check=False)  # a half-made environment is not reused
        output = (getattr(error, "stderr", "") or "").strip().splitlines()
        return f"pip could not install litellm[proxy]=={VERSION}: {output[-1] if output else error}"
    return command


@contextmanager
def litellm(*, instant_base: str, stream_base: str):
    """The proxy, running while the block runs (a Peer without a url, saying why, if it cannot run)."""
    command = install()
    if isinstance(command, str):
        yield Peer(why=command)
        return
    config = {"model_list": [
        {"model_name": "bench-gpt", "litellm_params": {"model": "openai/bench-gpt", "api_base": instant_base,
                                                       "api_key": "sk-bench-secret-000000"}},
        {"model_name": STREAM_MODEL, "litellm_params": {"model": "openai/bench-gpt", "api_base": stream_base,
                                                        "api_key": "sk-bench-secret-000000"}}],
        "litellm_settings": {"telemetry": False}, "general_settings": {"master_key": MASTER_KEY}}
    config_file = VENV / "bench-config.yaml"
    config_file.write_text(json.dumps(config))  # JSON is YAML
    # No database and no Redis (the portal's are in the environment); the model price list from the
    # package, not fetched from the network at start.
    env = {name: value for name, value in os.environ.items() if name not in ("DATABASE_URL", "REDIS_URL")} | {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"}
    port = free_port()
    try:
        process = start([str(command), "--config", str(config_file), "--host", "127.0.0.1", "--port", str(port),
                         "--num_workers", str(WORKERS)], port, env=env, path="/health/liveliness", seconds=180)
    except RuntimeError as error:
        yield Peer(why=f"litellm {VERSION} did not start: {error}")
        return
    try:
        yield Peer(url=f"http://127.0.0.1:{port}", pid=process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def instant(*, wrk, url: str, connections: int, seconds: float, direct: dict, direct_1: dict, metered: dict,
            metered_1: dict) -> list[str]:
    """The peer on the instant provider, as the gateway's own instant figures are measured (wrk)."""
    wrk(f"{url}/v1/chat/completions", connections=connections, seconds=2, keys=[MASTER_KEY])  # warm up, as the gateway
    peer = wrk(f"{url}/v1/chat/completions", connections=connections, seconds=seconds, keys=[MASTER_KEY])
    peer_1 = wrk(f"{url}/v1/chat/completions", connections=1, seconds=seconds / 2, keys=[MASTER_KEY])
    return [f"peer.litellm_version: {VERSION}, {WORKERS} workers, no database",
            f"peer.litellm_rps: {peer['rps']:.0f} req/s",
            f"peer.litellm_ratio: {peer['rps'] / direct['rps']:.3f}",
            f"peer.litellm_p50: {peer_1['p50_ms']:.2f} ms",
            f"peer.litellm_added_p50: {peer_1['p50_ms'] - direct_1['p50_ms']:.2f} ms",
            f"gateway.metered_vs_litellm: {metered['rps'] / peer['rps']:.2f}",
            f"gateway.added_p50_vs_litellm: {(metered_1['p50_ms'] - direct_1['p50_ms']):.2f} ms against "
            f"{peer_1['p50_ms'] - direct_1['p50_ms']:.2f} ms"]
