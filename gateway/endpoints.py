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
from functools import wraps

from django.conf import settings
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.views.decorators.csrf import csrf_exempt

from gateway import crypto, metering, sandbox
from gateway.metering import ENDPOINT_FAMILY, Begun, GatewayError
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
from portal.tenancy import _presented_key

log = logging.getLogger(__name__)
Status = UsageRecord.Status
UPSTREAM_PATHS = {"chat": "/chat/completions", "embeddings": "/embeddings", "messages": "/messages"}
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 502: "api_error", 503: "overloaded_error", 504: "api_error"}


def error_response(family: str, error: GatewayError, *, request_id: str = "") -> JsonResponse:
    if family == "anthropic":
        body = {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(error.status, "api_error"),
                                           "message": error.message}}
    else:
        body = {"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.code}}
    response = JsonResponse(body, status=error.status)
    if error.status == 429:
        response["x-should-retry"] = "false"  # the SDKs would retry a 429; a spent allowance stays spent
    if error.status == 401:
        response["WWW-Authenticate"] = "Bearer"
    if request_id:
        response["x-request-id"] = request_id
    return response


def _sse(family: str, payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event and family == "anthropic" else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


def _stream_error(family: str, message: str) -> bytes:
    if family == "anthropic":
        return _sse(family, {"type": "error", "error": {"type": "api_error", "message": message}}, "error")
    return _sse(family, {"error": {"message": message, "type": "api_error", "param": None, "code": None}})


_pending: set[asyncio.Task] = set()


async def _finish(begun: Begun, **outcome) -> None:
    """Settle in a task of its own: a client that disconnects cancels the response, not the settlement."""
    outcome["latency_ms"] = int((time.perf_counter() - begun.started) * 1000)
    task = asyncio.ensure_future(metering.afinish(begun, **outcome))
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


async def _proxy(request, endpoint: str):
    family = ENDPOINT_FAMILY[endpoint]
    request_id = uuid.uuid4().hex
    if request.method != "POST":
        return error_response(family, GatewayError(405, "invalid_request_error", f"Use POST for {request.path}."))
    started = time.perf_counter()
    raw = request.read(settings.GATEWAY_MAX_BODY_BYTES + 1)  # Django's own form limit is far smaller
    if len(raw) > settings.GATEWAY_MAX_BODY_BYTES:
        return error_response(family, GatewayError(
            413, "invalid_request_error", f"The request body is larger than {settings.GATEWAY_MAX_BODY_BYTES:,} bytes."))
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        return error_response(family, GatewayError(400, "invalid_request_error", "The body must be a JSON object."))
    try:
        begun = await metering.abegin(raw_key=_presented_key(request), ip=request.META.get("REMOTE_ADDR"),
                                      endpoint=endpoint, body=body, request_id=request_id, started=started)
    except GatewayError as error:
        return error_response(family, error, request_id=request_id)
    forwarded = body | {"model": begun.route.provider_model}
    client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage")) if isinstance(
        body.get("stream_options"), dict) else False
    if begun.stream and endpoint == "chat":
        forwarded["stream_options"] = {"include_usage": True}  # usage arrives in the stream's last chunk
    if begun.route.is_sandbox:
        return await _from_sandbox(begun, body, client_wants_usage)
    return await _from_provider(begun, forwarded, client_wants_usage)


# -- the built-in sandbox ----------------------------------------------------------------------------


async def _from_sandbox(begun: Begun, body: dict, client_wants_usage: bool):
    family, limit = ENDPOINT_FAMILY[begun.endpoint], metering.sandbox_limit(begun, body)
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
    return JsonResponse(data, headers={"x-request-id": begun.request_id})


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
    return HttpResponse(content, content_type="application/json", headers={"x-request-id": begun.request_id})


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
    return HttpResponse(content, status=status, content_type="application/json",
                        headers={"x-request-id": begun.request_id})


def _streaming(begun: Begun, reader: StreamReader, source, *, upstream=None) -> StreamingHttpResponse:
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

    response = StreamingHttpResponse(events(), content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["x-request-id"] = begun.request_id
    return response


# -- the views ---------------------------------------------------------------------------------


def _never_html(view):
    """Whatever goes wrong inside, the client gets JSON in its API's shape, never Django's 500 page."""
    family = "anthropic" if view.__name__ == "messages" else "openai"

    @wraps(view)
    async def wrapped(request, *args, **kwargs):
        try:
            return await view(request, *args, **kwargs)
        except Exception:
            log.exception("gateway error on %s", request.path)
            return error_response(family, GatewayError(500, "api_error", "The gateway failed on this request; it was "
                                                       "not charged. Try again, or tell your administrators."))

    return wrapped


@csrf_exempt
@_never_html
async def chat_completions(request):
    return await _proxy(request, "chat")


@csrf_exempt
@_never_html
async def embeddings(request):
    return await _proxy(request, "embeddings")


@csrf_exempt
@_never_html
async def messages(request):
    return await _proxy(request, "messages")


@csrf_exempt
@_never_html
async def models(request):
    """The catalog models this key may use, in OpenAI's shape (or Anthropic's, for its SDK)."""
    anthropic = "anthropic-version" in request.headers
    family = "anthropic" if anthropic else "openai"
    if request.method != "GET":
        return error_response(family, GatewayError(405, "invalid_request_error", "Use GET for /v1/models."))
    try:
        identity, config = await metering.in_thread(metering.lookup)(raw_key=_presented_key(request),
                                                                     ip=request.META.get("REMOTE_ADDR"), endpoint=None)
    except GatewayError as error:
        return error_response(family, error)
    routes = sorted(metering.models_for(identity, config), key=lambda route: route.model_id)
    if anthropic:
        data = [{"type": "model", "id": r.model_id, "display_name": r.model_id, "created_at": "2026-01-01T00:00:00Z"}
                for r in routes]
        return JsonResponse({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})
    return JsonResponse({"object": "list", "data": [
        {"id": r.model_id, "object": "model", "created": 0, "owned_by": config.slug} for r in routes]})


@csrf_exempt
@_never_html
async def not_found(request):
    return error_response("openai", GatewayError(404, "not_found_error", f"No gateway endpoint at {request.path}."))
