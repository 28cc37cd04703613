"""The gateway's refusals, in the API's own words."""


class GatewayError(Exception):
    """HTTP status, error type (OpenAI-style), message, and optionally the code and parameter."""

    def __init__(self, status: int, kind: str, message: str, *, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.message, self.code, self.param = status, kind, message, code, param
