"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}}, and the parameter a validation
error names."""

from __future__ import annotations

from fastapi.responses import JSONResponse


class APIError(Exception):
    """An HTTP error the routes raise; the app answers it as an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.kind, self.code)


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


TAGS = {"text", "image_url"}  # discriminator values of content parts


def param_of(loc: tuple) -> str | None:
    """("body", "messages", 0, "content", ...) -> "messages[0].content..."; pydantic's union-member labels
    ("str", "list[...]") and the discriminator value it puts after a list index are left out."""
    out, prev = "", None
    for p in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif not ("[" in p or p == "str" or (isinstance(prev, int) and p in TAGS)):
            out += ("." if out else "") + p
        prev = p
    return out or None
