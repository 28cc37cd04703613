"""The gateway's OpenAI- and Anthropic-compatible endpoints (async views, served under ASGI).

Request flow (DESIGN.md): key -> scopes -> model (or its alias) -> worst-case price -> hold ->
forward (a stream passes through as it arrives) -> settle with the provider's usage -> release the
rest. Every answer, refusals and failures included, is JSON in the API's own error shape (every
/v1/messages... path in Anthropic's, the others in OpenAI's).

A request reaches its provider as an exchange in one of the provider's wire formats: the
endpoint's own, or, for the Responses API on a provider with chat completions only, a chat
completion that gateway.responses translates both ways. The sandbox answers an exchange as a
provider would.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import uuid
from dataclasses import dataclass

from django.conf import settings
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from apikeys.authentication import presented_key
from gateway import bounds, crypto, metering, responses, sandbox
from gateway.apis import ENDPOINTS
from gateway.errors import GatewayError
from gateway.metering import Begun
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
    usage_of,
)
from portal.async_db import in_thread

log = logging.getLogger(__name__)
Status = UsageRecord.Status
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 502: "api_error", 503: "overloaded_error", 504: "api_error"}
# Moderations report no usage (the real API's neither): they are charged their input bound.
UNREPORTED_USAGE = {"moderations"}


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
    return JSONResponse(body, status_code=error.status, headers=headers | _id_headers(family, request_id))


def _id_headers(family: str, request_id: str) -> dict:
    """The request's id, as every answer carries it (Anthropic's SDK reads its own header name)."""
    if not request_id:
        return {}
    return {"x-request-id": request_id} | ({"request-id": request_id} if family == "anthropic" else {})


def _sse(payload: dict, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(payload)}\n\n".encode()


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


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999: valid JSON, but no provider and no JSON answer can carry it
        raise ValueError(f"{text} is not a finite number")
    return number


def _not_a_number(name: str):
    raise ValueError(f"{name} is not JSON")


def _json_object(raw: bytes) -> dict:
    try:
        body = json.loads(raw or b"null", parse_float=_finite, parse_constant=_not_a_number)
    except (ValueError, UnicodeDecodeError):
        body = None
    except RecursionError:
        raise GatewayError(400, "invalid_request_error", "The body is nested too deeply.") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_request_error", "The body must be a JSON object.")
    return body


def _ip(request: Request) -> str | None:
    return request.client.host if request.client else None


def _method_not_allowed(request: Request, family: str, *methods: str) -> JSONResponse:
    return error_response(family, GatewayError(405, "invalid_request_error",
                                               f"Use {' or '.join(methods)} for {request.url.path}."))


# -- what goes to the provider -----------------------------------------------------------------------


@dataclass
class Exchange:
    """A request as its provider receives it: in which wire format, at which path, with which body;
    and, for a translated Responses request, how to answer it."""

    wire: str  # chat, responses, completions, embeddings, moderations or messages
    path: str
    body: dict
    translation: responses.Translation | None = None


def _translation_plan(body: dict):
    """For begin(): a Responses request on a provider without the Responses API is translated (or
    refused, if it cannot be) before anything is held."""

    def plan(route, worst):
        if route.has_responses_api:
            return None
        return responses.to_chat(body, cap_field=metering.cap_field(route), output_cap=worst.output_cap)

    return plan


def _exchange(begun: Begun, body: dict) -> Exchange:
    model = {"model": begun.route.provider_model}
    if begun.plan is not None:
        chat, translation = begun.plan
        return Exchange("chat", ENDPOINTS["chat"].upstream, chat | model, translation)
    # The provider keeps to the output cap the hold covers, in the one field it honours.
    forwarded = {name: value for name, value in body.items() if name not in begun.drop} | model | begun.forward
    if begun.stream and begun.endpoint in ("chat", "completions"):
        forwarded["stream_options"] = {"include_usage": True}  # usage arrives in the stream's last chunk
    return Exchange(begun.endpoint, ENDPOINTS[begun.endpoint].upstream, forwarded)


def _client_wants_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return bool(options.get("include_usage")) if isinstance(options, dict) else False


async def _proxy(request: Request, endpoint: str):
    family = ENDPOINTS[endpoint].family
    request_id = uuid.uuid4().hex
    if request.method != "POST":
        return _method_not_allowed(request, family, "POST")
    started = time.perf_counter()
    try:
        body = _json_object(await _body(request))
        begun = await metering.begin(raw_key=presented_key(request.headers), ip=_ip(request), endpoint=endpoint,
                                     body=body, request_id=request_id, started=started,
                                     plan=_translation_plan(body) if endpoint == "responses" else None)
    except GatewayError as error:
        return error_response(family, error, request_id=request_id)
    try:
        exchange = _exchange(begun, body)
        if begun.route.is_sandbox:
            return await _from_sandbox(begun, exchange, _client_wants_usage(body))
        return await _from_provider(begun, exchange, _client_wants_usage(body), request)
    except Exception:
        # The gateway failed after the hold was taken: settle what is known (nothing) and release the
        # hold now, rather than leave it to the sweeper; the client gets the 500 in its API's shape.
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail="the gateway failed on this request")
        raise


# -- answering ---------------------------------------------------------------------------------------


async def _answer(begun: Begun, exchange: Exchange, data: dict, content: bytes | None = None):
    """A whole reply: settle with its usage, then send it (translated, if the request was)."""
    usage, detail = usage_of(exchange.wire, data), ""
    if usage is None and begun.endpoint in UNREPORTED_USAGE:
        usage, detail = Usage(input=begun.input_bound), "the provider reports no usage here: charged the input bound"
    response_id = ""
    if exchange.translation is not None:
        data, content = exchange.translation.from_chat(data), None
        response_id = data["id"]
    elif begun.endpoint == "responses" and isinstance(data.get("id"), str):
        response_id = data["id"]
    if content is None:  # rendered before settling: a reply that cannot be sent is not charged
        content = JSONResponse(data).body
    await _finish(begun, status=Status.OK, usage=usage, detail=detail, response_id=response_id)
    return Response(content, media_type="application/json", headers=_headers(begun))


def _headers(begun: Begun) -> dict:
    headers = _id_headers(ENDPOINTS[begun.endpoint].family, begun.request_id)
    if begun.routed_from:  # budget-aware routing served the request with the economy counterpart
        headers |= {"x-portal-routed-from": begun.routed_from, "x-portal-routed-to": begun.route.model_id}
    return headers


async def _from_sandbox(begun: Begun, exchange: Exchange, client_wants_usage: bool):
    wire, body, limit = exchange.wire, exchange.body, begun.output_cap
    if not begun.stream:
        reply = {"chat": sandbox.chat_completion, "messages": sandbox.message, "completions": sandbox.completion,
                 "embeddings": lambda b, _: sandbox.embeddings(b), "moderations": lambda b, _: sandbox.moderation(b)}
        return await _answer(begun, exchange, reply[wire](body, limit))
    if wire == "messages":
        blocks = [_sse(data, event) for event, data in sandbox.message_events(body, limit)]
    else:
        chunks = sandbox.chat_completion_chunks(body, limit) if wire == "chat" else sandbox.completion_chunks(body,
                                                                                                                limit)
        blocks = [_sse(chunk) for chunk in chunks] + [b"data: [DONE]\n\n"]
    reader = StreamReader(wire, pass_usage_chunk=client_wants_usage or exchange.translation is not None)
    return _streaming(begun, reader, _async_blocks(blocks), translation=exchange.translation)


async def _async_blocks(blocks):
    for block in blocks:
        yield block
        await asyncio.sleep(0)  # like a real stream: other requests run between chunks


def _upstream_url(route, path: str, request: Request | None) -> str:
    url = route.base_url + path
    if request is not None and route.family == "anthropic" and request.query_params.get("beta") == "true":
        url += "?beta=true"  # what Claude Code asks of Anthropic's API, passed on
    return url


async def _call(route, *, path: str, body: dict | None, request: Request, method: str = "POST"):
    """One provider call: the aiohttp response, or _Unavailable saying why there is none."""
    family = route.family if route.family != "any" else "openai"
    try:
        secret = crypto.decrypt(route.secret_ciphertext)
    except ValueError as error:
        raise _Unavailable(Status.UPSTREAM_ERROR, str(error), GatewayError(
            502, "api_error", "The provider connection's secret cannot be read; an administrator must enter it "
            "again.")) from None
    try:
        return await session().request(
            method, _upstream_url(route, path, request), data=json.dumps(body).encode() if body is not None else None,
            headers=provider_headers(family, secret, request.headers),
            timeout=timeouts(route.connect_timeout, route.read_timeout))
    except UpstreamTimeout:
        raise _Unavailable(Status.TIMEOUT, "no answer from the provider in time", GatewayError(
            504, "api_error", "The provider did not answer in time; nothing was charged.")) from None
    except UpstreamError as error:
        message = (error.client_message if isinstance(error, UpstreamRefused)
                   else "The provider could not be reached; nothing was charged.")
        raise _Unavailable(Status.UPSTREAM_ERROR, f"{type(error).__name__}: {error}",
                           GatewayError(502, "api_error", message)) from None


class _Unavailable(Exception):
    """No reply from the provider: the record's status and detail, and the client's error."""

    def __init__(self, status: str, detail: str, error: GatewayError):
        super().__init__(detail)
        self.status, self.detail, self.error = status, detail, error


async def _from_provider(begun: Begun, exchange: Exchange, client_wants_usage: bool, request: Request):
    family = ENDPOINTS[begun.endpoint].family
    try:
        response = await _call(begun.route, path=exchange.path, body=exchange.body, request=request)
    except _Unavailable as failed:
        await _finish(begun, status=failed.status, usage=None, detail=failed.detail)
        return error_response(family, failed.error, request_id=begun.request_id)
    if response.status >= 400:
        content = await _read_refusal(response)
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=f"provider answered {response.status}")
        return _refusal(family, response.status, content, request_id=begun.request_id)
    if begun.stream:
        reader = StreamReader(exchange.wire, pass_usage_chunk=client_wants_usage or exchange.translation is not None)
        return _streaming(begun, reader, response.content.iter_any(), upstream=response,
                          translation=exchange.translation)
    try:
        content = await response.read()
        data = json.loads(content)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
    except (UpstreamTimeout, UpstreamError, ValueError) as error:
        await _finish(begun, status=Status.UPSTREAM_ERROR, usage=None, detail=f"unreadable reply: {error}")
        return error_response(family, GatewayError(502, "api_error", "The provider's reply was cut off or unreadable; "
                                                   "nothing was charged."), request_id=begun.request_id)
    finally:
        response.release()
    return await _answer(begun, exchange, data, content)


async def _read_refusal(response) -> bytes:
    try:
        return await response.read()
    except (UpstreamTimeout, UpstreamError):
        return b""
    finally:
        response.release()


def _refusal(family: str, status: int, content: bytes, *, request_id: str = "") -> Response:
    """A provider's 4xx is the client's business (passed through); its 5xx and auth failures are ours."""
    if status in (401, 403) or status >= 500:
        reason = ("refused the organization's credentials" if status in (401, 403) else f"failed ({status})")
        return error_response(family, GatewayError(502, "api_error", f"The provider {reason}; nothing was charged."),
                              request_id=request_id)
    try:
        is_json_error = isinstance(json.loads(content), dict)
    except (ValueError, UnicodeDecodeError):
        is_json_error = False
    if not is_json_error:  # e.g. a proxy's HTML page for a wrong base URL: say so in the API's shape
        return error_response(family, GatewayError(status, "invalid_request_error", (
            f"The provider answered {status} without an API error; nothing was charged. Check the provider "
            "connection's base URL.")), request_id=request_id)
    return Response(content, status_code=status, media_type="application/json",
                    headers=_id_headers(family, request_id))


def _stream_error(begun: Begun, reader: StreamReader, translator, message: str) -> list[bytes]:
    """An error event in the client's API, for a stream that broke off."""
    if translator is not None:
        return translator.error(message)
    if begun.endpoint == "responses":
        return [_sse({"type": "error", "code": "api_error", "message": message, "param": None,
                      "sequence_number": reader.sequence_number + 1}, "error")]
    if ENDPOINTS[begun.endpoint].family == "anthropic":
        return [_sse({"type": "error", "error": {"type": "api_error", "message": message}}, "error")]
    return [_sse({"error": {"message": message, "type": "api_error", "param": None, "code": None}})]


def _streaming(begun: Begun, reader: StreamReader, source, *, upstream=None, translation=None) -> StreamingResponse:
    """Pass the provider's events through as they arrive (translated into the Responses API's, if
    the request was). The stream's final event ([DONE], Anthropic's message_stop, the Responses
    API's response.completed) is held back until the request is settled, so a client that has
    read to the end of the stream sees its balance already debited."""
    translator = translation.stream() if translation is not None else None

    async def events():
        outcome, settled, final = {"status": Status.OK, "detail": ""}, False, []
        try:
            if translator is not None:
                for block in translator.start():
                    yield block
            async for data in source:
                for block, is_final in reader.feed(data):
                    for out in (translator.feed(block) if translator is not None else [block]):
                        if is_final:
                            final.append(out)
                        else:
                            yield out
            if translator is not None:
                final = translator.close()
        except (asyncio.CancelledError, GeneratorExit):
            outcome = {"status": Status.CLIENT_DISCONNECT, "detail": "the client went away mid-stream"}
            raise
        except UpstreamTimeout:
            outcome = {"status": Status.TIMEOUT, "detail": "the provider stopped sending mid-stream"}
            final = _stream_error(begun, reader, translator,
                                  "The provider stopped answering; you are charged for what was sent.")
        except UpstreamError as error:
            outcome = {"status": Status.UPSTREAM_ERROR, "detail": f"{type(error).__name__} mid-stream"}
            final = _stream_error(begun, reader, translator,
                                  "The provider's stream broke off; you are charged for what was sent.")
        except Exception:
            log.exception("gateway error mid-stream on request %s", begun.request_id)
            outcome = {"status": Status.UPSTREAM_ERROR, "detail": "the gateway failed mid-stream"}
            final = _stream_error(begun, reader, translator,
                                  "The gateway failed on this stream; you are charged for what was sent.")
        finally:
            if upstream is not None:
                # A stream read to its end goes back to the pool; one cut short is dropped.
                if outcome["status"] == Status.OK:
                    upstream.release()
                else:
                    upstream.close()
            response_id = translator.t.id if translator is not None else reader.response_id
            if outcome["status"] == Status.CLIENT_DISCONNECT:
                await _finish(begun, usage=reader.usage, produced_tokens=reader.produced_text_tokens,
                              response_id=response_id, **outcome)
                settled = True
        if not settled:
            await _finish(begun, usage=reader.usage, produced_tokens=reader.produced_text_tokens,
                          response_id=response_id, **outcome)
        for block in final:
            yield block

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **_headers(begun)})


# -- counting tokens (free) --------------------------------------------------------------------------


async def _count(request: Request, endpoint: str):
    """Anthropic's /v1/messages/count_tokens and the Responses API's /input_tokens: forwarded to a
    provider that has them, estimated with the sandbox's count otherwise (exact for the sandbox);
    never charged, nothing recorded."""
    family = ENDPOINTS[endpoint].family
    if request.method != "POST":
        return _method_not_allowed(request, family, "POST")
    try:
        body = _json_object(await _body(request))
        identity, config = await metering.lookup(raw_key=presented_key(request.headers), ip=_ip(request),
                                                 endpoint=endpoint)
        route = metering.route_of(identity, config, endpoint, body, any_family=True)
        shape = "messages" if endpoint == "count_tokens" else "responses"
        bounds.bound(shape, family, body | {"max_tokens": 1} if shape == "messages" else body, most_output=1)
        native = route.family == "anthropic" if shape == "messages" else route.has_responses_api
        if native and not route.is_sandbox:
            return await _count_at_provider(request, route, ENDPOINTS[endpoint].upstream, body, family)
        if shape == "messages":
            return JSONResponse({"input_tokens": sandbox.count_message_tokens(body)})
        chat, _ = responses.to_chat(body, cap_field="max_tokens", output_cap=1)
        return JSONResponse({"object": "response.input_tokens", "input_tokens": sandbox.prompt_tokens(chat)})
    except GatewayError as error:
        return error_response(family, error)


async def _count_at_provider(request: Request, route, path: str, body: dict, family: str):
    try:
        response = await _call(route, path=path, body=body | {"model": route.provider_model}, request=request)
    except _Unavailable as failed:
        return error_response(family, failed.error)
    content = await _read_refusal(response)
    if response.status >= 400:
        return _refusal(family, response.status, content)
    return Response(content, media_type="application/json")


# -- stored responses --------------------------------------------------------------------------------


async def _stored_response(request: Request, response_id: str, suffix: str, methods: tuple[str, ...]):
    """GET (or DELETE) /v1/responses/{id}, its /input_items, and POST .../cancel: forwarded to the
    provider that made the response, if the key's member made it through the portal."""
    if request.method not in methods:
        return _method_not_allowed(request, "openai", *methods)
    try:
        identity, config = await metering.lookup(raw_key=presented_key(request.headers), ip=_ip(request),
                                                 endpoint="responses")
        model_id = await in_thread(metering.response_model)(identity, response_id)
        route = config.models.get(model_id) if model_id is not None else None
        if route is None:
            raise GatewayError(404, "not_found_error", f"No response `{response_id}` was made through the portal "
                               "with your keys.", code="response_not_found")
        if not route.has_responses_api or route.is_sandbox:
            raise GatewayError(404, "not_found_error", (
                f"The response `{response_id}` was made by a provider without stored responses (the gateway "
                "translated it into chat completions), and the portal keeps no responses itself."),
                               code="response_not_stored")
        path = f"/responses/{response_id}{suffix}" + (f"?{request.url.query}" if request.url.query else "")
        response = await _call(route, path=path, body=None, request=request, method=request.method)
    except GatewayError as error:
        return error_response("openai", error)
    except _Unavailable as failed:
        return error_response("openai", failed.error)
    content = await _read_refusal(response)
    if response.status >= 400:
        return _refusal("openai", response.status, content)
    return Response(content, media_type="application/json")


# -- the views ---------------------------------------------------------------------------------


async def chat_completions(request: Request):
    return await _proxy(request, "chat")


async def create_response(request: Request):
    return await _proxy(request, "responses")


async def completions(request: Request):
    return await _proxy(request, "completions")


async def embeddings(request: Request):
    return await _proxy(request, "embeddings")


async def moderations(request: Request):
    return await _proxy(request, "moderations")


async def messages(request: Request):
    return await _proxy(request, "messages")


async def count_tokens(request: Request):
    return await _count(request, "count_tokens")


async def input_tokens(request: Request):
    return await _count(request, "input_tokens")


async def response(request: Request, response_id: str):
    return await _stored_response(request, response_id, "", ("GET", "DELETE"))


async def response_input_items(request: Request, response_id: str):
    return await _stored_response(request, response_id, "/input_items", ("GET",))


async def response_cancel(request: Request, response_id: str):
    return await _stored_response(request, response_id, "/cancel", ("POST",))


async def response_compact(request: Request):
    return error_response("openai", GatewayError(
        404, "not_found_error", "Compacting a conversation at the provider is not available through the portal: the "
        "gateway cannot bound what a compacted item counts. Compact it in the client (Codex CLI does, when this "
        "is refused)."))


def _anthropic_shape(request: Request) -> bool:
    return "anthropic-version" in request.headers


def _model_object(request: Request, model_id: str, config) -> dict:
    if _anthropic_shape(request):
        return {"type": "model", "id": model_id, "display_name": model_id, "created_at": "2026-01-01T00:00:00Z"}
    return {"id": model_id, "object": "model", "created": 0, "owned_by": config.slug}


async def models(request: Request):
    """The model ids this key may use (catalog models and their aliases), in OpenAI's shape (or
    Anthropic's, for its SDK)."""
    family = "anthropic" if _anthropic_shape(request) else "openai"
    if request.method != "GET":
        return _method_not_allowed(request, family, "GET")
    try:
        identity, config = await metering.lookup(raw_key=presented_key(request.headers), ip=_ip(request),
                                                 endpoint=None)
    except GatewayError as error:
        return error_response(family, error)
    except metering.DATABASE_ERRORS:
        return error_response(family, metering.database_unavailable())
    data = [_model_object(request, model_id, config) for model_id in sorted(metering.models_for(identity, config))]
    if family == "anthropic":
        return JSONResponse({"data": data, "has_more": False, "first_id": data[0]["id"] if data else None,
                             "last_id": data[-1]["id"] if data else None})
    return JSONResponse({"object": "list", "data": data})


async def model(request: Request, model_id: str):
    """One model id: a catalog model's, or any id an alias maps onto one, if this key may use it."""
    family = "anthropic" if _anthropic_shape(request) else "openai"
    if request.method != "GET":
        return _method_not_allowed(request, family, "GET")
    try:
        identity, config = await metering.lookup(raw_key=presented_key(request.headers), ip=_ip(request),
                                                 endpoint=None)
        if metering.model_for(identity, config, model_id) is None:
            raise GatewayError(404, "not_found_error", f"The model `{model_id}` is not one this key may use; GET "
                               "/v1/models lists them.", code="model_not_found", param="model")
    except GatewayError as error:
        return error_response(family, error)
    except metering.DATABASE_ERRORS:
        return error_response(family, metering.database_unavailable())
    return JSONResponse(_model_object(request, model_id, config))


def _family_of(path: str) -> str:
    return "anthropic" if path == "/v1/messages" or path.startswith("/v1/messages/") else "openai"


async def not_found(request: Request):
    path = request.url.path
    what = ("Message batches are not available through the portal; send each request to /v1/messages."
            if path.startswith("/v1/messages/batches") else f"No gateway endpoint at {path}.")
    return error_response(_family_of(path), GatewayError(404, "not_found_error", what))


# Paths, with {name} for one path segment and {name:path} for the rest of the path.
VIEWS = {
    "/v1/chat/completions": chat_completions,
    "/v1/responses": create_response,
    "/v1/responses/input_tokens": input_tokens,
    "/v1/responses/compact": response_compact,
    "/v1/responses/{response_id}": response,
    "/v1/responses/{response_id}/input_items": response_input_items,
    "/v1/responses/{response_id}/cancel": response_cancel,
    "/v1/completions": completions,
    "/v1/embeddings": embeddings,
    "/v1/moderations": moderations,
    "/v1/messages": messages,
    "/v1/messages/count_tokens": count_tokens,
    "/v1/models": models,
    "/v1/models/{model_id:path}": model,
}
_EXACT = {path: view for path, view in VIEWS.items() if "{" not in path}
_TEMPLATES = [(re.compile("^" + re.sub(r"\{(\w+)(:path)?\}", lambda m: f"(?P<{m[1]}>{'.+' if m[2] else '[^/]+'})",
                                       path) + "$"), view) for path, view in VIEWS.items() if "{" in path]


def _view_of(path: str):
    """The view for a path, and the values of its template's names."""
    path = path.rstrip("/") or "/"
    if path in _EXACT:
        return _EXACT[path], {}
    for pattern, view in _TEMPLATES:
        if found := pattern.match(path):
            return view, found.groupdict()
    return not_found, {}


async def application(scope, receive, send):
    """The gateway's ASGI application: /v1/... only (portal.asgi routes those here)."""
    request = Request(scope, receive)
    view, values = _view_of(request.url.path)
    try:
        response = await view(request, **values)
    except ClientDisconnect:
        return  # gone before its body arrived: nothing was held
    except Exception:
        # Whatever goes wrong inside, the client gets JSON in its API's shape, never a bare 500 page.
        log.exception("gateway error on %s", request.url.path)
        response = error_response(_family_of(request.url.path), GatewayError(
            500, "api_error", "The gateway failed on this request; it was not charged. Try again, or tell your "
            "administrators."))
    await response(scope, receive, send)


async def refuse_websocket(scope, receive, send) -> None:
    """A WebSocket (the Responses API's WebSocket mode, or any other): refused at the handshake with
    a JSON error where the server can send one, closed otherwise. Never left hanging."""
    family = _family_of(scope.get("path", ""))
    message = ("WebSocket connections are not available through the portal; use HTTP (the Responses API "
               "streams over server-sent events with `stream: true`).")
    await receive()  # websocket.connect
    if "websocket.http.response" in scope.get("extensions", {}):
        response = error_response(family, GatewayError(400, "invalid_request_error", message))
        await send({"type": "websocket.http.response.start", "status": response.status_code,
                    "headers": response.raw_headers})
        await send({"type": "websocket.http.response.body", "body": response.body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
