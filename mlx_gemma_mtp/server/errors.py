"""Errors of `gemma-mtp serve`, answered in OpenAI's shape with their HTTP status."""

import math
from typing import Optional

from fastapi.responses import JSONResponse


# --- errors --------------------------------------------------------------------------------------


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 kind: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers  # e.g. Retry-After on a 429

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad(message: str, param: Optional[str] = None, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param, code)


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", code="server_shutting_down")


def retry_headers(seconds: float) -> dict:
    """Retry-After in whole seconds (HTTP's), and in milliseconds as OpenAI's clients read it first."""
    return {"Retry-After": str(max(1, math.ceil(seconds))), "retry-after-ms": str(max(1, round(seconds * 1000)))}


def too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes (the server's --max-body-bytes)",
                    code="request_too_large")


def validation_error(errors: list) -> APIError:
    """pydantic's type errors as one OpenAI-shaped error naming the first field (422)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = ".".join(str(x) for x in first.get("loc", ()) if x != "body") or None
    return APIError(422, f"{param or 'body'}: {first.get('msg')}", param, "invalid_type")


# Browser chat UIs served from this machine (any port) may call the API; other origins only when
# named with --allow-origin (the server has no authentication).
