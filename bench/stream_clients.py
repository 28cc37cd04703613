"""Streaming clients for the long-stream benchmark, one process of them (bench/streams.py starts
as many as the load needs): each client opens a streaming chat completion, reads it to its end
and opens the next, on keep-alive connections as the SDKs do.

Reads its job as JSON on stdin: url, model, keys (one per client in turn; none for a provider
called directly), clients, start_at and window_start / window_end (wall-clock times shared with
the other processes), and out (a file). Clients start spread over [start_at, window_start); a
stream that ends inside the window is counted; none is started after the window. Writes JSON to out: the
counted streams, and per counted stream the time to first byte of the reply, the time from its
first to its last content chunk, and the time to its final [DONE].
"""

import asyncio
import json
import sys
import time

import aiohttp
import uvloop


async def client(number: int, session: aiohttp.ClientSession, job: dict, found: dict) -> None:
    keys = job["keys"]
    headers = {"content-type": "application/json"}
    if keys:
        headers["authorization"] = f"Bearer {keys[number % len(keys)]}"
    body = json.dumps({"model": job["model"], "max_tokens": job["max_tokens"], "stream": True,
                       "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "Write two hundred words about tokens."}]})
    await asyncio.sleep(max(job["start_at"] + (job["window_start"] - job["start_at"]) * number / job["clients"]
                            - time.time(), 0))
    while time.time() < job["window_end"]:
        started = time.time()
        first = last = None
        tail = b""
        try:
            async with session.post(job["url"], data=body, headers=headers) as response:
                if response.status != 200:
                    found["errors"].append(f"{response.status}: {(await response.text())[:200]}")
                    await asyncio.sleep(1)
                    continue
                async for data in response.content.iter_any():
                    now = time.time()
                    if first is None:
                        first = now
                    if b'"stop"' in data:  # the chunk that ends the reply's content
                        last = now
                    tail = (tail + data)[-64:]
                done = time.time()
        except (aiohttp.ClientError, asyncio.TimeoutError) as error:
            found["errors"].append(f"{type(error).__name__}: {error}")
            await asyncio.sleep(1)
            continue
        if b"data: [DONE]" not in tail or last is None:
            found["errors"].append(f"a stream ended without its final chunks: {tail[-64:]!r}")
            continue
        if job["window_start"] <= done <= job["window_end"]:
            found["first_ms"].append(round((first - started) * 1000, 2))
            found["content_ms"].append(round((last - first) * 1000, 2))
            found["done_ms"].append(round((done - started) * 1000, 2))


async def main(job: dict) -> dict:
    found = {"first_ms": [], "content_ms": [], "done_ms": [], "errors": []}
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(client(number, session, job, found) for number in range(job["offset"],
                                                                                       job["offset"] + job["count"])))
    found["error_count"], found["errors"] = len(found["errors"]), found["errors"][:10]
    return found


if __name__ == "__main__":
    job = json.loads(sys.stdin.read())
    found = uvloop.run(main(job))
    with open(job["out"], "w") as out:
        json.dump(found, out)
