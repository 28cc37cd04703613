"""Gateway throughput and latency, against the same instant fake provider called directly, in one run.

- gateway.direct_rps / gateway.metered_rps: non-streaming chat completions per second at 16
  connections (wrk), to the fake provider directly and through the portal's gateway (uvicorn,
  PostgreSQL and Redis: key check, hold, forward, settle, usage record). The metered requests
  come from 64 members' keys in turn, as an organization's traffic does.
- gateway.direct_p50 / gateway.metered_p50 / gateway.added_p50: median latency at 1 connection.
- gateway.governed_rps / gateway.governed_p50: the same through a second organization with the
  spend governance switched on: budget-aware routing (every member's policy routes, and each
  request after a member's first is served by the economy counterpart: both worst cases bound,
  the routed hold statement, the routing headers) and the spend-velocity breaker (limits no
  request reaches, so its Redis script runs on every settlement); gateway.governed_ratio and
  gateway.governed_added_p50 compare it with the metered figures of the same run.
- ingest.events_per_s: usage events recorded per second through POST /api/v1/usage in batches
  of 1,000 (2 clients).

- streams.*: long streams from a provider that takes its time (bench/streams.py), and peer.*:
  LiteLLM's proxy measured the same way on the same fake providers (bench/peer.py).

Run with `make bench-gateway` (a private durable PostgreSQL and Redis are started for it).
BENCH_ONLY=ingest measures only the ingest rate (quicker when working on the ingest API);
BENCH_STREAMS=0 leaves out the long streams and the peer, BENCH_PEER=0 the peer alone.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench._database import create_database, database_url  # noqa: E402
from bench import peer, streams  # noqa: E402

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "portal.settings")
os.environ["DEBUG"] = "0"
os.environ["LOG_LEVEL"] = "WARNING"
os.environ["DATABASE_URL"] = database_url("portal_bench_gateway")

import django  # noqa: E402


django.setup()

import httpx  # noqa: E402

from tests.support.fake_upstream import free_port  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "8"))
ONLY_INGEST = os.environ.get("BENCH_ONLY") == "ingest"
LONG_STREAMS = not ONLY_INGEST and os.environ.get("BENCH_STREAMS", "1") == "1"
WITH_PEER = LONG_STREAMS and os.environ.get("BENCH_PEER", "1") == "1"
CONNECTIONS = 16
INGEST_BATCH, INGEST_CLIENTS = 1000, 2
BODY = {"model": "bench-gpt", "max_tokens": 16, "messages": [{"role": "user", "content": "Say hello in five words."}]}
MEMBERS = 64
# One uvicorn process per core, as the portal would be deployed; the fake provider gets one.
GATEWAY_WORKERS = int(os.environ.get("GATEWAY_WORKERS", str(os.cpu_count() or 1)))
WRK_SCRIPT = """
local body = [[%s]]
local keys = {%s}
local counter = 0
request = function()
  counter = counter + 1
  local headers = {["Content-Type"] = "application/json"}
  if #keys > 0 then headers["Authorization"] = "Bearer " .. keys[(counter %% #keys) + 1] end
  return wrk.format("POST", nil, headers, body)
end
"""




def seed(upstream_url: str, *, name: str = "Bench", governed: bool = False) -> tuple[list[str], str]:
    """An organization whose model is served by the fake provider; 64 funded members with a key
    each, and an ingest key. `governed`: with an economy counterpart that every member's policy
    routes to from their second request on, and breaker limits no request reaches."""
    from allowances import ledger
    from allowances import services as allowance_services
    from allowances.models import MAX_TOKENS
    from apikeys.services import api_key_create
    from gateway import services as gateway_services
    from portal.models import Member
    from portal.services import organization_create
    from portal.tenancy import scope
    from tests.factories import MemberFactory, UserFactory

    tag = name.lower()
    owner = UserFactory(email=f"owner@{tag}.example")
    organization = organization_create(owner=owner, name=name)
    with scope(organization):
        member = Member.objects.get(organization=organization)
        connection = gateway_services.provider_connection_create(
            organization=organization, actor=owner, name="Fake provider", kind="openai", base_url=upstream_url,
            secret="sk-bench-secret-000000", connect_timeout=5, read_timeout=30)
        premium = allowance_services.catalog_model_create(organization=organization, actor=owner,
                                                          model_id="bench-gpt", display_name="Bench",
                                                          connection=connection)
        if governed:
            mini = allowance_services.catalog_model_create(organization=organization, actor=owner,
                                                           model_id="bench-gpt-mini", display_name="Bench mini",
                                                           connection=connection)
            allowance_services.catalog_model_update(catalog_model=premium, actor=owner, economy_counterpart=mini)
            # 100%: less than everything granted is left once anything is held or used.
            policy = allowance_services.policy_create(organization=organization, actor=owner, name="Routes",
                                                      monthly_tokens=0, economy_below_percent=100)
            gateway_services.breaker_settings_save(
                organization=organization, actor=owner, key_per_minute=MAX_TOKENS, key_per_hour=MAX_TOKENS,
                member_per_minute=MAX_TOKENS, member_per_hour=MAX_TOKENS, organization_per_minute=MAX_TOKENS,
                organization_per_hour=MAX_TOKENS)
        allowance_services.account_open(member=member)
        _key, ingest_secret = api_key_create(member=member, actor=owner, name="ingest", endpoints=["usage_write"])
        secrets = []
        for number in range(MEMBERS):
            employee = MemberFactory(organization=organization, user__email=f"m{number}@{tag}.example")
            if governed:
                allowance_services.policy_assign(organization=organization, actor=owner, policy=policy,
                                                 member=employee, immediately=True)
            account = allowance_services.account_open(member=employee)
            ledger.post(account=account, kind="bonus", tokens=10**12, idempotency_key="bench-funds")
            secrets.append(api_key_create(member=employee, actor=employee.user, name="bench", endpoints=["chat"])[1])
    return secrets, ingest_secret


def routed_share() -> float:
    """The share of the governed organization's requests that routing served with the economy model."""
    from gateway.models import UsageRecord
    from portal.tenancy import unscoped

    with unscoped():
        records = UsageRecord.all_objects.filter(organization__name="Governed", source="gateway")
        total = records.count()
        return records.exclude(routed_from="").count() / total if total else 0.0


def serve(app: str, port: int, workers: int = 1) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--no-access-log",
         "--log-level", "warning", "--workers", str(workers)], cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
            return process
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{app} did not start")


def wrk(url: str, *, connections: int, seconds: float, keys: list[str] = ()) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(WRK_SCRIPT % (json.dumps(BODY), ", ".join(f'"{key}"' for key in keys)))
    out = subprocess.run(["wrk", "-t", str(min(connections, 2)), "-c", str(connections), "-d", f"{max(int(seconds), 1)}s",
                          "--latency", "-s", script.name, url], capture_output=True, text=True, check=True).stdout
    os.unlink(script.name)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non_2xx:
        raise SystemExit(f"{url} answered errors under load:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    scale = {"us": 0.001, "ms": 1, "s": 1000}[p50.group(2)]
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale}


def ingest_rate(base: str, key: str, seconds: float) -> float:
    """Events recorded per second. The batches are encoded before the clock starts: on 2 shared cores
    the client's own encoding would be counted against the server (wrk plays that part for the
    gateway figures)."""
    events_done = [0]
    most_batches = int(seconds * 30)  # per client: 30 batches a second is far beyond what is reached

    def body(client: int, number: int) -> bytes:
        return json.dumps({"events": [{"idempotency_key": f"c{client}-b{number}-e{n}-{uuid.uuid4().hex[:8]}",
                                       "member": f"m{n % MEMBERS}@bench.example", "model": "bench-gpt",
                                       "input_tokens": 120, "output_tokens": 40} for n in range(INGEST_BATCH)]}).encode()

    bodies = [[body(client, number) for number in range(most_batches)] for client in range(INGEST_CLIENTS)]

    def client(mine: list[bytes]):
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"}, timeout=60) as http:
            for content in mine:
                if time.monotonic() >= deadline:
                    return
                answer = http.post("/api/v1/usage", content=content)
                if answer.status_code != 200 or answer.json()["recorded"] != INGEST_BATCH:
                    raise SystemExit(f"ingest answered {answer.status_code}: {answer.text[:300]}")
                events_done[0] += INGEST_BATCH

    started = time.monotonic()
    deadline = started + seconds
    threads = [threading.Thread(target=client, args=(mine,)) for mine in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return events_done[0] / (time.monotonic() - started)


def long_streams_and_peer(*, upstream_port: int, stream_port: int, gateway: subprocess.Popen, gateway_port: int,
                          stream_keys: list[str], instant: dict) -> list[str]:
    """The long-stream phases on the running gateway, and the peer on the instant and streaming providers."""
    with streams.provider(stream_port) as stream_base, (
            peer.litellm(instant_base=f"http://127.0.0.1:{upstream_port}/v1", stream_base=stream_base) if WITH_PEER
            else contextlib.nullcontext(peer.Peer(why="left out (BENCH_PEER=0)"))) as litellm:
        lines = [f"peer.litellm: not measured: {litellm.why}"] if litellm.url is None else peer.instant(
            wrk=wrk, url=litellm.url, connections=CONNECTIONS, seconds=SECONDS, **instant)
        lines += streams.phases(direct_url=f"{stream_base}/chat/completions",
                                metered_url=f"http://127.0.0.1:{gateway_port}/v1/chat/completions",
                                gateway_pid=gateway.pid, keys=stream_keys, peer_url=litellm.url, peer_pid=litellm.pid,
                                peer_model=peer.STREAM_MODEL, peer_keys=[peer.MASTER_KEY])
    return lines


def main():
    streams.raise_open_files_limit()  # before the servers start: they inherit it
    create_database("portal_bench_gateway")
    upstream_port, gateway_port, stream_port = free_port(), free_port(), free_port()
    upstream = serve("bench.fake_upstream_app:app", upstream_port)
    try:
        keys, ingest_key = seed(f"http://127.0.0.1:{upstream_port}/v1")
        governed_keys, _ = seed(f"http://127.0.0.1:{upstream_port}/v1", name="Governed", governed=True)
        if LONG_STREAMS:
            stream_keys, _ = seed(f"http://127.0.0.1:{stream_port}/v1", name="Streams")
        gateway = serve("portal.asgi:application", gateway_port, workers=GATEWAY_WORKERS)
        try:
            direct_url = f"http://127.0.0.1:{upstream_port}/v1/chat/completions"
            metered_url = f"http://127.0.0.1:{gateway_port}/v1/chat/completions"
            if not ONLY_INGEST:
                wrk(metered_url, connections=CONNECTIONS, seconds=2, keys=keys)  # warm up caches and connections
                wrk(metered_url, connections=CONNECTIONS, seconds=2, keys=governed_keys)
                direct = wrk(direct_url, connections=CONNECTIONS, seconds=SECONDS)
                metered = wrk(metered_url, connections=CONNECTIONS, seconds=SECONDS, keys=keys)
                governed = wrk(metered_url, connections=CONNECTIONS, seconds=SECONDS, keys=governed_keys)
                direct_1 = wrk(direct_url, connections=1, seconds=SECONDS / 2)
                metered_1 = wrk(metered_url, connections=1, seconds=SECONDS / 2, keys=keys)
                governed_1 = wrk(metered_url, connections=1, seconds=SECONDS / 2, keys=governed_keys)
            ingest = ingest_rate(f"http://127.0.0.1:{gateway_port}", ingest_key, SECONDS)
            if LONG_STREAMS:
                long_streams = long_streams_and_peer(
                    upstream_port=upstream_port, stream_port=stream_port, gateway=gateway, gateway_port=gateway_port,
                    stream_keys=stream_keys, instant={"direct": direct, "direct_1": direct_1, "metered": metered,
                                                      "metered_1": metered_1})
        finally:
            gateway.terminate()
            gateway.wait()
    finally:
        upstream.terminate()
        upstream.wait()
    from allowances.ledger import verify

    print(f"gateway.workers: {GATEWAY_WORKERS} processes")
    if not ONLY_INGEST:
        print(f"gateway.direct_rps: {direct['rps']:.0f} req/s")
        print(f"gateway.metered_rps: {metered['rps']:.0f} req/s")
        print(f"gateway.metered_ratio: {metered['rps'] / direct['rps']:.3f}")
        print(f"gateway.direct_p50: {direct_1['p50_ms']:.2f} ms")
        print(f"gateway.metered_p50: {metered_1['p50_ms']:.2f} ms")
        print(f"gateway.added_p50: {metered_1['p50_ms'] - direct_1['p50_ms']:.2f} ms")
        print(f"gateway.governed_rps: {governed['rps']:.0f} req/s")
        print(f"gateway.governed_ratio: {governed['rps'] / metered['rps']:.3f}")
        print(f"gateway.governed_p50: {governed_1['p50_ms']:.2f} ms")
        print(f"gateway.governed_added_p50: {governed_1['p50_ms'] - metered_1['p50_ms']:.2f} ms")
        print(f"gateway.governed_routed: {routed_share():.3f} of governed requests")
    print(f"ingest.events_per_s: {ingest:.0f} events/s")
    print(f"gateway.verify_problems: {len(verify())} accounts")
    if LONG_STREAMS:
        print("\n".join(long_streams))


if __name__ == "__main__":
    main()
