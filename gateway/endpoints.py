"""The gateway's OpenAI- and Anthropic-compatible endpoints (async views, served under ASGI).

Request flow (DESIGN.md): key -> scopes -> model -> worst-case price -> hold -> forward (a stream
passes through as it arrives) -> settle with the provider's usage -> release the rest. Every
answer, refusals and failures included, is JSON in the API's own error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from django.conf import settings
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from apikeys.authentication import presented_key
from gateway import crypto, metering, sandbox
from gateway.errors import GatewayError
from gateway.metering import ENDPOINT_FAMILY, Begun
from gateway.models import UsageRecord
from gateway.upstream import (
    StreamReader,
    UpstreamError,
    UpstreamRefused,
    UpstreamTimeout,
    Usage,
    provider_headers,
    session,
    timeouts,
)

log = logging.getLogger(__name__)
Status = UsageRecord.Status
UPSTREAM_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "messages": "/messages"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 502: "api_error", 503: "overloaded_error", 504: "api_error"}


def error_response(family: str, error: GatewayError, *, request_id: str = "") -> JSONResponse:
    if family == "anthropic":
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"),
                                           "message": error.message}}
    else:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    headers = {}
    if error.status == 429:
        headers["x-should-retry"] = "false"  # the SDKs would retry a 429; a spent allowance stays spent
    if error.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    if request_id:
        headers["x-request-id"] = request_id
    return JSONResponse(body, status_code=error.status, headers=headers)


def _sse(family: str, payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event and family == "anthropic" else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def _stream_error(family: str, message: str) -> bytes:
    if family == "anthropic":
        return _sse(family, {"type": "error", "error": {"type": "api_error", "message": message}}, "error")
    return _sse(family, {"error": {"message": message, "type": "api_error", "param": None, "code": None}})


_pending: set[asyncio.Task] = set()


async def settle_pending() -> None:
    """Wait for the settlements still running (a server shutting down)."""
    if _pending:
        await asyncio.gather(*_pending, return_exceptions=True)


async def _finish(begun: Begun, **outcome) -> None:
    """Settle in a task of its own: a client that disconnects cancels the response, not the settlement."""
    outcome["latency_ms"] = int((time.perf_counter() - begun.started) * 1000)
    task = asyncio.ensure_future(metering.finish(begun, **outcome))
    _pending.add(task)
    task.add_done_callback(_pending.discard)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        pass  # the task goes on
    except Exception:  # the hold's time-to-live releases it; say loudly that usage went unrecorded
        log.exception("settling request %s failed", begun.request_id)


def _usage_of(family: str, data) -> Usage | None:
    usage = data.get("usage") if isinstance(data, dict) else None
    if not isinstance(usage, dict):
        return None
    return Usage.from_anthropic(usage) if family == "anthropic" else Usage.from_openai(usage)


async def _body(request: Request) -> bytes:
    """The request body, or a 413 as soon as it is larger than the gateway forwards."""
    limit = settings.GATEWAY_MAX_BODY_BYTES
    declared = request.headers.get("content-length", "")
    too_large = GatewayError(413, "invalid_request_error", f"The request body is larger than {limit:,} bytes.")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        body = None
    except RecursionError:
        raise GatewayError(400, "invalid_request_error", "The body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_request_error", "The body must be a JSON object.")
    return body


async def _proxy(request: Request, endpoint: str):
    family = ENDPOINT_FAMILY[endpoint]
    request_id = uuid.uuid4().hex
    if request.method != "POST":
        return error_response(family, GatewayError(405, "invalid_request_error", f"Use POST for {request.url.path}."))
    started = time.perf_counter()
    try:
        body = _json_object(await _body(request))
        begun = await metering.begin(raw_key=presented_key(request.headers),
                                     ip=request.client.host if request.client else None, endpoint=endpoint,
                                     body=body, request_id=request_id, started=started)
    except GatewayError as error:
        return error_response(family, error, request_id=request_id)
    # The provider keeps to the output cap the hold covers: the client's own, or the one set here.
    forwarded = {name: value for name, value in body.items() if name not in begun.drop}
    forwarded |= {"model": begun.route.provider_model} | begun.forward
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
        body.get("stream_options"), dict) else False
    if begun.stream and endpoint == "chat":
        forwarded["stream_options"] = {"include_usage": True}  # usage arrives in the stream's last chunk
    try:
        if begun.route.is_sandbox:
            return await _from_sandbox(begun, body, client_wants_usage)
        return await _from_provider(begun, forwarded, client_wants_usage)
    except Exception:
        # The gateway failed after the hold was taken: settle what is known (nothing) and release the
        # hold now, rather than leave it to the sweeper; the client gets the 500 in its API's shape.
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail="the gateway failed on this request")
        raise


# -- the built-in sandbox ----------------------------------------------------------------------------


async def _from_sandbox(begun: Begun, body: dict, client_wants_usage: bool):
    family, limit = ENDPOINT_FAMILY[begun.endpoint], begun.output_cap
    if begun.endpoint == "embeddings":
        data = sandbox.embeddings(body)
    elif not begun.stream:
        data = sandbox.chat_completion(body, limit) if begun.endpoint == "chat" else sandbox.message(body, limit)
    else:
        reader = StreamReader(family, pass_usage_chunk=client_wants_usage)
        if begun.endpoint == "chat":
            blocks = [_sse(family, chunk) for chunk in sandbox.chat_completion_chunks(body, limit)] + [b"data: [DONE]\n\n"]
        else:
            blocks = [_sse(family, data, event) for event, data in sandbox.message_events(body, limit)]
        return _streaming(begun, reader, _async_blocks(blocks))
    await _finish(begun, status=Status.OK, usage=_usage_of(family, data))
    return JSONResponse(data, headers={"x-request-id": begun.request_id})


async def _async_blocks(blocks):
    for block in blocks:
        yield block
        await asyncio.sleep(0)  # like a real stream: other requests run between chunks


# -- a real provider -----------------------------------------------------------------------------


async def _from_provider(begun: Begun, forwarded: dict, client_wants_usage: bool):
    route, family = begun.route, ENDPOINT_FAMILY[begun.endpoint]
    try:
        secret = crypto.decrypt(route.secret_ciphertext)
    except ValueError as error:
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=str(error))
        return error_response(family, GatewayError(502, "api_error", "The provider connection's secret cannot be "
                                                   "read; an administrator must enter it again."), request_id=begun.request_id)
    try:
        response = await session().post(
            route.base_url + UPSTREAM_PATHS[begun.endpoint], data=json.dumps(forwarded).encode(),
            headers=provider_headers(route.family if route.family != "any" else family, secret),
            timeout=timeouts(route.connect_timeout, route.read_timeout))
    except UpstreamTimeout:
        await _finish(begun, status=Status.TIMEOUT, usage=None, detail="no answer from the provider in time")
        return error_response(family, GatewayError(504, "api_error", "The provider did not answer in time; nothing was "
                                                   "charged."), request_id=begun.request_id)
    except UpstreamError as error:
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=f"{type(error).__name__}: {error}")
        message = (error.client_message if isinstance(error, UpstreamRefused)
                   else "The provider could not be reached; nothing was charged.")
        return error_response(family, GatewayError(502, "api_error", message), request_id=begun.request_id)
    if response.status >= 400:
        return await _provider_refused(begun, response)
    if begun.stream:
        return _streaming(begun, StreamReader(family, pass_usage_chunk=client_wants_usage), response.content.iter_any(),
                          upstream=response)
    try:
        content = await response.read()
        data = json.loads(content)
    except (UpstreamTimeout, UpstreamError, ValueError) as error:
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=f"unreadable reply: {error}")
        return error_response(family, GatewayError(502, "api_error", "The provider's reply was cut off or unreadable; "
                                                   "nothing was charged."), request_id=begun.request_id)
    finally:
        response.release()
    await _finish(begun, status=Status.OK, usage=_usage_of(family, data))
    return Response(content, media_type="application/json", headers={"x-request-id": begun.request_id})


async def _provider_refused(begun: Begun, response):
    """A provider's 4xx is the client's business (passed through); its 5xx and auth failures are ours."""
    family = ENDPOINT_FAMILY[begun.endpoint]
    try:
        content = await response.read()
    except (UpstreamTimeout, UpstreamError):
        content = b""
    finally:
        response.release()
    status = response.status
    await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=f"provider answered {status}")
    if status in (401, 403) or status >= 500:
        reason = ("refused the organization's credentials" if status in (401, 403) else f"failed ({status})")
        return error_response(family, GatewayError(502, "api_error", f"The provider {reason}; nothing was charged."),
                              request_id=begun.request_id)
    try:
        is_json_error = isinstance(json.loads(content), dict)
    except (ValueError, UnicodeDecodeError):
        is_json_error = False
    if not is_json_error:  # e.g. a proxy's HTML page for a wrong base URL: say so in the API's shape
        return error_response(family, GatewayError(status, "invalid_request_error", (
            f"The provider answered {status} without an API error; nothing was charged. Check the provider "
            "connection's base URL.")), request_id=begun.request_id)
    return Response(content, status_code=status, media_type="application/json",
                        headers={"x-request-id": begun.request_id})


def _streaming(begun: Begun, reader: StreamReader, source, *, upstream=None) -> StreamingResponse:
    """Pass the provider's events through as they arrive. The stream's final event ([DONE], or
    Anthropic's message_stop) is held back until the request is settled, so a client that has read
    to the end of the stream sees its balance already debited."""
    family = ENDPOINT_FAMILY[begun.endpoint]

    async def events():
        outcome, settled, final = {"status": Status.OK, "detail": ""}, False, []
        try:
            async for data in source:
                for block in reader.feed(data):
                    if reader.is_final(block):
                        final.append(block)
                    else:
                        yield block
        except (asyncio.CancelledError, GeneratorExit):
            outcome = {"status": Status.CLIENT_DISCONNECT, "detail": "the client went away mid-stream"}
            raise
        except UpstreamTimeout:
            outcome = {"status": Status.TIMEOUT, "detail": "the provider stopped sending mid-stream"}
            final = [_stream_error(family, "The provider stopped answering; you are charged for what was sent.")]
        except UpstreamError as error:
            outcome = {"status": Status.UPSTREAM_ERROR, "detail": f"{type(error).__name__} mid-stream"}
            final = [_stream_error(family, "The provider's stream broke off; you are charged for what was sent.")]
        except Exception:
            log.exception("gateway error mid-stream on request %s", begun.request_id)
            outcome = {"status": Status.UPSTREAM_ERROR, "detail": "the gateway failed mid-stream"}
            final = [_stream_error(family, "The gateway failed on this stream; you are charged for what was sent.")]
        finally:
            if upstream is not None:
                # A stream read to its end goes back to the pool; one cut short is dropped.
                if outcome["status"] == Status.OK:
                    upstream.release()
                else:
                    upstream.close()
            if outcome["status"] == Status.CLIENT_DISCONNECT:
                await _finish(begun, usage=reader.usage, produced_tokens=reader.produced_text_tokens, **outcome)
                settled = True
        if not settled:
            await _finish(begun, usage=reader.usage, produced_tokens=reader.produced_text_tokens, **outcome)
        for block in final:
            yield block

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "x-request-id": begun.request_id})


# -- the views ---------------------------------------------------------------------------------


async def chat_completions(request: Request):
    return await _proxy(request, "chat")


async def embeddings(request: Request):
    return await _proxy(request, "embeddings")


async def messages(request: Request):
    return await _proxy(request, "messages")


async def models(request: Request):
    """The catalog models this key may use, in OpenAI's shape (or Anthropic's, for its SDK)."""
    anthropic = "anthropic-version" in request.headers
    family = "anthropic" if anthropic else "openai"
    if request.method != "GET":
        return error_response(family, GatewayError(405, "invalid_request_error", "Use GET for /v1/models."))
    try:
        identity, config = await metering.lookup(raw_key=presented_key(request.headers),
                                                 ip=request.client.host if request.client else None, endpoint=None)
    except GatewayError as error:
        return error_response(family, error)
    except metering.DATABASE_ERRORS:
        return error_response(family, metering.database_unavailable())
    routes = sorted(metering.models_for(identity, config), key=lambda route: route.model_id)
    if anthropic:
        data = [{"type": "model", "id": r.model_id, "display_name": r.model_id, "created_at": "2026-01-01T00:00:00Z"}
                for r in routes]
        return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})
    return JSONResponse({"object": "list", "data": [
        {"id": r.model_id, "object": "model", "created": 0, "owned_by": config.slug} for r in routes]})


def _family_of(path: str) -> str:
    return "anthropic" if path.startswith("/v1/messages") else "openai"


async def not_found(request: Request):
    return error_response(_family_of(request.url.path),
                          GatewayError(404, "not_found_error", f"No gateway endpoint at {request.url.path}."))


VIEWS = {"/v1/chat/completions": chat_completions, "/v1/embeddings": embeddings, "/v1/messages": messages,
         "/v1/models": models}


async def application(scope, receive, send):
    """The gateway's ASGI application: /v1/... only (portal.asgi routes those here)."""
    request = Request(scope, receive)
    view = VIEWS.get(request.url.path.rstrip("/") or "/", not_found)
    try:
        response = await view(request)
    except ClientDisconnect:
        return  # gone before its body arrived: nothing was held
    except Exception:
        # Whatever goes wrong inside, the client gets JSON in its API's shape, never a bare 500 page.
        log.exception("gateway error on %s", request.url.path)
        response = error_response(_family_of(request.url.path), GatewayError(
            500, "api_error", "The gateway failed on this request; it was not charged. Try again, or tell your "
            "administrators."))
    await response(scope, receive, send)
