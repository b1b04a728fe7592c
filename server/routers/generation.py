"""/v1/completions and /v1/chat/completions: one flow, two wire shapes (framed exactly as vLLM emits them).

Streaming: `data: {json}\\n\\n` chunks; chat opens with the role; the last content chunk carries finish_reason;
with stream_options.include_usage a usage chunk with empty choices follows; then `data: [DONE]`. Errors found
before the first token are plain HTTP errors; an error after it is one `data: {"error": ...}` chunk, then [DONE].
The last chunk is sent only after the session's new memory is committed, so finish_reason means "saved".
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.core import ClientGone, DoneEvent, TokenEvent
from server.deps import CLIENT_CLOSED, REPLAYED, Departure, get_runtime, get_tenant, session_binding
from server.errors import APIError, as_api_error, error_body
from server.protocol import ChatCompletionRequest, CompletionRequest, SamplingFields
from server.runtime import Replay, Runtime

router = APIRouter(prefix="/v1", tags=["generation"])



def compact(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def json_floats(values: list[float]) -> list[float | None]:
    """Surprise values as JSON can carry them: a non-finite one (a memory driven to overflow) becomes null, never
    the bare NaN that JSON parsers refuse."""
    return [v if math.isfinite(v) else None for v in values]


class Shape:
    """The wire shape of one request: ids, chunk and response bodies, for text or chat completions."""

    def __init__(self, chat: bool, model: str, surprise: bool, token_ids: bool):
        self.chat, self.model, self.surprise, self.token_ids = chat, model, surprise, token_ids
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion.chunk" if chat else "text_completion"
        head = compact({"id": self.id, "object": self.object, "created": self.created, "model": self.model})
        self._prefix = f'data: {head[:-1]},"choices":'

    def choice(self, text: str | None, finish: str | None, surprise: list[float], ids: list[int],
               role: bool = False, stop_reason: str | None = None) -> dict:
        """As vLLM: completions chunks always carry stop_reason, chat chunks only the last one."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            out = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            if finish is not None:
                out["stop_reason"] = stop_reason
        else:
            out = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish,
                   "stop_reason": stop_reason}
        if self.surprise:
            out["surprise"] = json_floats(surprise)
        if self.token_ids and not role:
            out["token_ids"] = ids
        return out

    def chunk(self, choices: list[dict], **extra) -> str:
        """One SSE event; the fields every chunk repeats are serialised once per request (see _prefix)."""
        tail = "".join(f',"{key}":{compact(value)}' for key, value in extra.items())
        return f"{self._prefix}{compact(choices)}{tail}}}\n\n"

    def response(self, text: str, finish: str, stop_reason: str | None, surprise: list[float], ids: list[int],
                 usage: dict, session: dict | None) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish, "stop_reason": stop_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish,
                      "stop_reason": stop_reason}
        if self.surprise:
            choice["surprise"] = json_floats(surprise)
        if self.token_ids:
            choice["token_ids"] = ids
        body = {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [choice], "usage": usage}
        if session:
            body["session"] = session
        return body


def usage_of(done: DoneEvent) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def respond(request: Request, rt: Runtime, tenant: str, req: SamplingFields, session_id: str | None,
                  prompt_ids: list[int], max_tokens: int, chat: bool, echo: str = "",
                  idempotency_key: str | None = None):
    rt.check_served_model(req.model)
    try:
        params = req.sampling(max_tokens, rt.model.chat.stop if chat else ())
    except ValueError as e:
        raise APIError(400, str(e), "invalid_sampling") from e
    # a client that leaves aborts its job at once (even during a long prefill): nothing is committed
    gone = Departure(request)
    events = rt.generate(tenant, session_id, prompt_ids, params, commit=req.memory == "commit",
                         want_surprise=req.return_surprise, on_job=gone.track, idempotency_key=idempotency_key)
    shape = Shape(chat, rt.model_name, req.return_surprise, req.return_token_ids)
    try:
        first = await anext(events)  # errors up to the first token are ordinary HTTP errors
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    except BaseException:
        gone.close()
        await close(events)
        raise
    if isinstance(first, Replay):  # this Idempotency-Key was committed already: its first answer again
        gone.close()
        await close(events)
        return replay(shape, first, req, echo)
    if req.stream:
        return StreamingResponse(stream(shape, first, events, req.include_usage(), echo, gone),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, surprise, ids, event, stop_reason = echo, [], [], first, None
    try:
        while True:
            surprise += event.surprise
            if isinstance(event, DoneEvent):
                break
            text += event.text
            ids += event.token_ids
            stop_reason = event.stop_reason
            event = await anext(events)
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED)
    finally:
        gone.close()
        await close(events)  # releases the session's lease now, not when the generator is collected
    return JSONResponse(shape.response(text, event.finish_reason, stop_reason, surprise, ids, usage_of(event),
                                       session_info(event.record)))


def session_info(record) -> dict | None:
    return {"id": record.id, "version": record.version} if record is not None else None


def replay(shape: Shape, prior: Replay, req: SamplingFields, echo: str) -> Response:
    """The answer a request with this Idempotency-Key gave when it committed, in the shape this retry asked for
    (a stream: its whole text in one chunk)."""
    a = prior.answer
    usage = {"prompt_tokens": a["prompt_tokens"], "completion_tokens": a["completion_tokens"],
             "total_tokens": a["prompt_tokens"] + a["completion_tokens"]}
    session = {"id": prior.record.id, "version": prior.record.version}
    if not req.stream:
        return JSONResponse(shape.response(echo + a["text"], a["finish_reason"], a["stop_reason"], a["surprise"],
                                           a["token_ids"], usage, session), headers=REPLAYED)
    chunks = [shape.chunk([shape.choice(None, None, [], [], role=True)])] if shape.chat else []
    chunks.append(shape.chunk([shape.choice(echo + a["text"], a["finish_reason"], a["surprise"], a["token_ids"],
                                            stop_reason=a["stop_reason"])], session=session))
    if req.include_usage():
        chunks.append(shape.chunk([], usage=usage))
    chunks.append("data: [DONE]\n\n")
    return StreamingResponse(iter(chunks), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **REPLAYED})


async def close(events) -> None:
    with anyio.CancelScope(shield=True):  # cleanup must finish even inside a cancelled scope
        await events.aclose()


async def stream(shape: Shape, first, events: AsyncIterator, include_usage: bool, echo: str,
                 gone: Departure) -> AsyncIterator[str]:
    held: TokenEvent | None = None  # the last token's chunk waits for the commit
    try:
        if shape.chat:
            yield shape.chunk([shape.choice(None, None, [], [], role=True)])
        elif echo:
            yield shape.chunk([shape.choice(echo, None, [], [])])
        event = first
        while True:
            if isinstance(event, DoneEvent):
                text = held.text if held else ""
                surprise = (held.surprise if held else []) + event.surprise
                ids = list(held.token_ids) if held else []
                session = session_info(event.record)
                yield shape.chunk([shape.choice(text, event.finish_reason, surprise, ids,
                                                stop_reason=held.stop_reason if held else None)],
                                  **({"session": session} if session else {}))
                if include_usage:
                    yield shape.chunk([], usage=usage_of(event))
                break
            if event.finish_reason is not None:
                held = event
            else:
                yield shape.chunk([shape.choice(event.text, None, event.surprise, list(event.token_ids))])
            event = await anext(events)
    except ClientGone:
        return
    except Exception as exc:  # after the first byte the status is sent: report in-band, as vLLM does
        err = as_api_error(exc)
        yield f"data: {json.dumps(error_body(err.status, err.message, err.code))}\n\n"
    finally:
        gone.close()
        await close(events)
    yield "data: [DONE]\n\n"


@router.post("/completions")
async def completions(request: Request, req: CompletionRequest, rt: Runtime = Depends(get_runtime),
                      tenant: str = Depends(get_tenant), x_session_id: str | None = Header(None),
                      idempotency_key: str | None = Header(None)):
    prompt = req.prompt
    prompt_ids = await rt.encode(prompt) if isinstance(prompt, str) \
        else list(prompt)
    max_tokens = 16 if req.max_tokens is None else req.max_tokens
    rt.check_prompt(prompt_ids, max_tokens)  # before decoding ids for echo
    echo = (prompt if isinstance(prompt, str) else rt.model.tokenizer.decode(prompt_ids)) if req.echo else ""
    return await respond(request, rt, tenant, req, session_binding(req.session_id, x_session_id), prompt_ids,
                         max_tokens, chat=False, echo=echo, idempotency_key=idempotency_key)


@router.post("/chat/completions")
async def chat_completions(request: Request, req: ChatCompletionRequest, rt: Runtime = Depends(get_runtime),
                           tenant: str = Depends(get_tenant), x_session_id: str | None = Header(None),
                           idempotency_key: str | None = Header(None)):
    try:
        # the model directory's template (engine.tokenizer.ChatTemplate). In a session only the new messages are
        # sent: the memory holds the conversation so far
        text = rt.model.chat.render([(m.role, m.text()) for m in req.messages])
    except ValueError as e:
        raise APIError(400, str(e), "invalid_content", "messages") from e
    limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_tokens = min(rt.settings.default_max_tokens, rt.settings.max_output_tokens) if limit is None else limit
    prompt_ids = await rt.encode(text)
    return await respond(request, rt, tenant, req, session_binding(req.session_id, x_session_id), prompt_ids,
                         max_tokens, chat=True, idempotency_key=idempotency_key)
