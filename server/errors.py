"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the status the openai SDKs expect."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine import SnapshotError
from server.store import StoreError, StoreUnavailable

log = logging.getLogger("titans.server")

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
         415: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error", 503: "unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


def as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, StoreUnavailable):
        log.warning("store unavailable (%s): %s", exc.reason, exc.detail)
        return APIError(exc.status, str(exc), exc.code, headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, StoreError):
        headers = {"x-should-retry": "false"} if exc.status == 429 else None
        return APIError(exc.status, str(exc), exc.code, headers=headers)
    if isinstance(exc, SnapshotError):
        return APIError(400, f"invalid snapshot: {exc}", "invalid_snapshot")
    log.exception("internal error", exc_info=exc)
    return APIError(500, "internal server error", "internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    err = as_api_error(exc)
    return JSONResponse(error_body(err.status, err.message, err.code, err.param), status_code=err.status,
                        headers=err.headers)


def describe(error: dict) -> str:
    """One pydantic error as a caller reads it: 'field.path: what is wrong'."""
    loc = error.get("loc", ())
    if error.get("type") == "json_invalid":
        offset = f" (at character {loc[-1]})" if loc and isinstance(loc[-1], int) else ""
        return f"body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}{offset}"
    return f"{'.'.join(str(p) for p in loc if p != 'body') or 'body'}: {error.get('msg')}"


def is_json(content_type: str) -> bool:
    """Whether FastAPI reads a body of this content type as JSON: application/json or application/*+json."""
    media = content_type.split(";", 1)[0].strip().lower()
    main, _, sub = media.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    @app.exception_handler(StoreError)
    @app.exception_handler(SnapshotError)
    async def _known(request: Request, exc: Exception):
        rt = getattr(request.app.state, "runtime", None)
        if rt is not None and isinstance(exc, StoreUnavailable):
            route = request.scope.get("route")
            rt.metrics.store_error(f"{request.method} {getattr(route, 'path', '?')}")  # a template, not an id
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        content_type = request.headers.get("content-type", "")
        if tuple(first.get("loc", ())) == ("body",) and not is_json(content_type):
            # FastAPI reads a body as JSON only when it says so: otherwise every field seems missing
            message = (f"the body must be JSON sent with 'Content-Type: application/json' (this request's content "
                       f"type: {content_type or 'none'})")
            return JSONResponse(error_body(415, message, "unsupported_media_type"), status_code=415)
        # a JSON syntax error's loc ends in a character offset, not a field: no param then
        where = [] if first.get("type") == "json_invalid" else [str(p) for p in first.get("loc", ()) if p != "body"]
        message = "; ".join(describe(e) for e in exc.errors()[:5])
        return JSONResponse(error_body(400, message or "invalid request", "invalid_request",
                                       ".".join(where) or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(exc.status_code, str(exc.detail), code), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        return error_response(exc)
