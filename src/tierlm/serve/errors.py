"""OpenAI-style error bodies: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tierlm.serve")

TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers


def body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}


def response(status: int, message: str, param: str | None = None, code: str | None = None,
             headers: dict | None = None) -> JSONResponse:
    return JSONResponse(body(status, message, param, code), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "function-after", "function-before",
              "function-wrap", "literal", "union", "nullable", "is-instance"}


def _path(loc) -> list:
    """The field path of a pydantic error location: drop 'body' and union member tags."""
    out = []
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in _TYPE_TAGS or "[" in part or part.startswith(("literal", "function"))):
            continue
        out.append(part)
    return out


def validation_message(err: dict) -> tuple[str, str | None, str]:
    """(message, param, code) for one pydantic error."""
    kind = err.get("type", "invalid")
    path = _path(err.get("loc", ()))
    if kind == "json_invalid":
        why = (err.get("ctx") or {}).get("error", "invalid JSON")
        return f"malformed JSON body: {why}", None, "json_invalid"
    dotted = ".".join(str(p) for p in path)
    param = dotted or None
    if kind == "extra_forbidden":
        return f"unknown field {dotted!r}", param, kind
    if kind == "missing":
        return (f"missing required field {dotted!r}" if dotted else "missing request body (a JSON object)"), param, kind
    msg = err.get("msg", "invalid value")
    return (f"{dotted}: {msg}" if dotted else f"request body: {msg}"), param, kind


def install(app) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        message, param, code = validation_message(errs[0]) if errs else ("invalid request", None, None)
        return response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "error"
        if exc.status_code == 404:
            msg = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        return response(exc.status_code, msg, None, None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return response(500, f"internal server error ({type(exc).__name__}); see the server log", None,
                        "internal_error")
