"""Long streams: the gateway under traffic that looks like a model's, against the same fake
provider called directly (and LiteLLM's proxy, bench/peer.py), in one run. Called from
bench/gateway.py's main, on the gateway it started.

The fake provider (bench/fake_stream_app.py) sends the first token after STREAM_FIRST_TOKEN_MS
(800) and a reply of STREAM_REPLY_TOKENS (200) at STREAM_TOKENS_PER_S (50), STREAM_CHUNK_TOKENS
(5) tokens a chunk, then its usage. At each of STREAM_CONCURRENCY (100,1000,4000) concurrent
clients (bench/stream_clients.py, in several processes), each reading a stream to its end and
opening the next, for STREAM_WINDOW_SECONDS (12) once every client has started and run one
stream, it prints per target (`direct`, `metered`, and `litellm` when the peer runs):
- streams.N.<target>_sps: streams completed per second, and streams.N.metered_ratio to direct;
- streams.N.<target>_added_ttft_p50 / _p99: time to the reply's first byte, minus direct's;
- streams.N.<target>_added_per_chunk: the time from the first to the last content chunk, minus
  direct's, per chunk (medians);
- streams.N.<target>_cpu_per_1000: CPU seconds of the server's processes (from /proc) per 1,000
  completed streams;
- streams.N.<target>_memory_per_stream: (resident memory of the server's processes halfway
  through the window - before the first phase) / N;
- streams.N.<target>_errors: requests that failed or were refused, from the clients' side, and
  streams.N.metered_not_ok: the gateway's usage records of the phase that are not `ok`;
- streams.N.verify_problems: accounts that verify_ledger finds wrong after the phase.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
FIRST_TOKEN_MS = int(os.environ.get("STREAM_FIRST_TOKEN_MS", "800"))
REPLY_TOKENS = int(os.environ.get("STREAM_REPLY_TOKENS", "200"))
TOKENS_PER_S = float(os.environ.get("STREAM_TOKENS_PER_S", "50"))
CHUNK_TOKENS = int(os.environ.get("STREAM_CHUNK_TOKENS", "5"))
CONCURRENCY = [int(n) for n in os.environ.get("STREAM_CONCURRENCY", "100,1000,4000").split(",") if n]
WINDOW_SECONDS = float(os.environ.get("STREAM_WINDOW_SECONDS", "12"))
PROVIDER_WORKERS = int(os.environ.get("STREAM_PROVIDER_WORKERS", str(os.cpu_count() or 1)))
CLIENTS_PER_PROCESS = 500  # beyond this one asyncio process falls behind on a shared core
MODEL = "bench-gpt"
CHUNKS = -(-REPLY_TOKENS // CHUNK_TOKENS)
STREAM_SECONDS = FIRST_TOKEN_MS / 1000 + REPLY_TOKENS / TOKENS_PER_S


def start(command: list[str], port: int, *, env: dict | None = None, path: str = "/",
          seconds: float = 60) -> subprocess.Popen:
    """A server process, once it answers on `port`."""
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[0]} exited with {process.returncode}")
        try:
            httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"{' '.join(command[:4])} did not answer on port {port}")


@contextmanager
def provider(port: int):
    """The fake streaming provider on `port`, as long as the block runs."""
    env = os.environ | {"FAKE_FIRST_TOKEN_MS": str(FIRST_TOKEN_MS), "FAKE_REPLY_TOKENS": str(REPLY_TOKENS),
                        "FAKE_TOKENS_PER_S": str(TOKENS_PER_S), "FAKE_CHUNK_TOKENS": str(CHUNK_TOKENS)}
    process = start([sys.executable, "-m", "uvicorn", "bench.fake_stream_app:app", "--host", "127.0.0.1", "--port",
                     str(port), "--no-access-log", "--log-level", "warning", "--backlog", "8192",
                     "--workers", str(PROVIDER_WORKERS)], port, env=env)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        process.terminate()
        process.wait()


def raise_open_files_limit() -> None:
    """Thousands of streams are thousands of sockets in each process: the soft limit up to the hard one."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# -- the server's processes, from /proc -------------------------------------------------------------


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (uvicorn's workers)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, grew = {pid}, True
    while grew:
        more = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= more
        grew = bool(more)
    return sorted(tree)


def cpu_seconds(pids: list[int]) -> float:
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / ticks


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


# -- one phase ---------------------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else math.nan


def run_clients(url: str, *, clients: int, keys: list[str] = (), model: str = MODEL, server_pid: int | None = None,
                idle_rss: int = 0) -> dict:
    """`clients` streaming clients on `url` for one window; their figures, and the CPU and memory of
    the server whose process is `server_pid` over the window."""
    processes = max(1, min(math.ceil(clients / CLIENTS_PER_PROCESS), os.cpu_count() or 1))
    start_at = time.time() + 1.5  # the client processes import aiohttp meanwhile
    # Clients start spread over one stream's length, at the rate they go on at, not all at once.
    window_start = start_at + 2 * STREAM_SECONDS + 1
    window_end = window_start + WINDOW_SECONDS
    job = {"url": url, "model": model, "keys": list(keys), "clients": clients, "max_tokens": REPLY_TOKENS + 56,
           "start_at": start_at, "window_start": window_start, "window_end": window_end}
    share = -(-clients // processes)
    runners = []
    for number in range(processes):
        out = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        out.close()
        runner = subprocess.Popen([sys.executable, str(ROOT / "bench" / "stream_clients.py")], stdin=subprocess.PIPE,
                                  text=True, cwd=ROOT)
        runner.stdin.write(json.dumps(job | {"offset": number * share, "count": min(share, clients - number * share),
                                             "out": out.name}))
        runner.stdin.close()
        runners.append((runner, out.name))
    pids = process_tree(server_pid) if server_pid else []
    time.sleep(max(window_start - time.time(), 0))
    cpu_before = cpu_seconds(pids)
    time.sleep(max(window_start + WINDOW_SECONDS / 2 - time.time(), 0))
    rss = resident_bytes(pids)
    time.sleep(max(window_end - time.time(), 0))
    cpu = cpu_seconds(pids) - cpu_before
    found = {"first_ms": [], "content_ms": [], "done_ms": [], "errors": [], "error_count": 0}
    for runner, out_name in runners:
        if runner.wait() != 0:
            raise RuntimeError(f"a process of streaming clients failed ({runner.returncode})")
        with open(out_name) as out_file:
            out = json.load(out_file)
        os.unlink(out_name)
        for name in found:
            found[name] += out[name]
    streams = len(found["done_ms"])
    return found | {"sps": streams / WINDOW_SECONDS, "streams": streams, "cpu_per_1000": cpu / streams * 1000 if
                    streams else math.nan, "memory_per_stream": (rss - idle_rss) / clients if pids else math.nan}


def records_not_ok(since) -> int:
    from gateway.models import UsageRecord
    from portal.tenancy import unscoped

    with unscoped():
        return UsageRecord.all_objects.filter(occurred_at__gte=since, source="gateway").exclude(status="ok").count()


def phases(*, direct_url: str, metered_url: str, gateway_pid: int, keys: list[str],
           peer_url: str | None = None, peer_pid: int | None = None, peer_model: str = MODEL,
           peer_keys: list[str] = ()) -> list[str]:
    """Every concurrency against every target; the printed lines."""
    from django.utils import timezone

    from allowances.ledger import verify

    raise_open_files_limit()
    lines = [f"streams.reply: {REPLY_TOKENS} tokens in chunks of {CHUNK_TOKENS} ({CHUNKS} chunks), first token "
             f"after {FIRST_TOKEN_MS} ms, {TOKENS_PER_S:g} tokens/s"]
    targets = {"metered": (metered_url, keys, MODEL, gateway_pid)}
    if peer_url:
        targets["litellm"] = (f"{peer_url}/v1/chat/completions", peer_keys, peer_model, peer_pid)
    idle = {name: resident_bytes(process_tree(pid)) for name, (*_, pid) in targets.items()}
    for clients in CONCURRENCY:
        phase_start = len(lines)
        direct = run_clients(direct_url, clients=clients)
        figures = {}
        for name, (url, target_keys, model, pid) in targets.items():
            since = timezone.now()
            figures[name] = run_clients(url, clients=clients, keys=target_keys, model=model, server_pid=pid,
                                        idle_rss=idle[name])
            if name == "metered":
                figures[name]["not_ok"] = records_not_ok(since)
        n = f"streams.{clients}"
        lines += [f"{n}.direct_sps: {direct['sps']:.1f} streams/s",
                  f"{n}.direct_ttft_p50: {quantile(direct['first_ms'], 0.5):.1f} ms",
                  f"{n}.direct_errors: {direct['error_count']} requests"]
        for name, found in figures.items():
            per_chunk = (quantile(found["content_ms"], 0.5) - quantile(direct["content_ms"], 0.5)) / max(CHUNKS - 1, 1)
            lines += [
                f"{n}.{name}_sps: {found['sps']:.1f} streams/s",
                f"{n}.{name}_ratio: {found['sps'] / direct['sps']:.3f}" if direct["sps"] else f"{n}.{name}_ratio: nan",
                f"{n}.{name}_added_ttft_p50: {quantile(found['first_ms'], 0.5) - quantile(direct['first_ms'], 0.5):.1f} ms",
                f"{n}.{name}_added_ttft_p99: {quantile(found['first_ms'], 0.99) - quantile(direct['first_ms'], 0.99):.1f} ms",
                f"{n}.{name}_added_per_chunk: {per_chunk:.2f} ms",
                f"{n}.{name}_cpu_per_1000: {found['cpu_per_1000']:.2f} s",
                f"{n}.{name}_memory_per_stream: {found['memory_per_stream'] / 1024:.1f} KB",
                f"{n}.{name}_errors: {found['error_count']} requests"]
            lines += [f"{n}.{name}_error: {error}" for error in found["errors"][:3]]
        lines.append(f"{n}.metered_not_ok: {figures['metered']['not_ok']} requests")
        if "litellm" in figures and figures["litellm"]["sps"]:
            lines.append(f"{n}.metered_vs_litellm: {figures['metered']['sps'] / figures['litellm']['sps']:.3f}")
        lines.append(f"{n}.verify_problems: {len(verify())} accounts")
        print("\n".join(lines[phase_start:]), file=sys.stderr, flush=True)  # progress: a phase takes a minute
    return lines
