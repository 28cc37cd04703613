"""A provider's usage report on loopback, for the reconciliation tests: OpenAI's organization usage
API (`GET /v1/organization/usage/completions`) and Anthropic's usage report
(`GET /v1/organizations/usage_report/messages`), both by day and model, from figures the test
sets, one day per page (so paging is exercised). It records the requests it was sent."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


class FakeUsageReports:
    def __init__(self):
        # (UTC day, model) -> (requests, uncached input, output, cached input)
        self.usage: dict[tuple[date, str], tuple[int, int, int, int]] = {}
        self.requests: list[Request] = []
        self.fail_status: int | None = None
        self.app = Starlette(routes=[
            Route("/v1/organization/usage/completions", self.openai),
            Route("/v1/organizations/usage_report/messages", self.anthropic),
        ])

    def _days(self, start: date, end: date, page: str | None) -> tuple[date | None, date | None]:
        day = date.fromisoformat(page) if page else start
        if day >= end:
            return None, None
        following = day + timedelta(days=1)
        return day, following if following < end else None

    def _results(self, day: date):
        return [(model, figures) for (on, model), figures in sorted(self.usage.items()) if on == day]

    async def openai(self, request: Request):
        self.requests.append(request)
        if self.fail_status:
            return JSONResponse({"error": {"message": "failed"}}, status_code=self.fail_status)
        start = datetime.fromtimestamp(int(request.query_params["start_time"]), UTC).date()
        end = datetime.fromtimestamp(int(request.query_params["end_time"]), UTC).date()
        day, following = self._days(start, end, request.query_params.get("page"))
        data = []
        if day is not None:
            begin = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())
            data.append({"object": "bucket", "start_time": begin, "end_time": begin + 86400, "results": [
                {"object": "organization.usage.completions.result", "model": model, "num_model_requests": n,
                 "input_tokens": uncached + cached, "input_cached_tokens": cached, "output_tokens": output,
                 "input_audio_tokens": 0, "output_audio_tokens": 0}
                for model, (n, uncached, output, cached) in self._results(day)]})
        return JSONResponse({"object": "page", "data": data, "has_more": following is not None,
                             "next_page": following.isoformat() if following else None})

    async def anthropic(self, request: Request):
        self.requests.append(request)
        if self.fail_status:
            return JSONResponse({"type": "error", "error": {"type": "api_error", "message": "failed"}},
                                status_code=self.fail_status)

        def day_of(text):
            return datetime.fromisoformat(text.replace("Z", "+00:00")).date()

        start, end = day_of(request.query_params["starting_at"]), day_of(request.query_params["ending_at"])
        day, following = self._days(start, end, request.query_params.get("page"))
        data = []
        if day is not None:
            data.append({"starting_at": f"{day.isoformat()}T00:00:00Z",
                         "ending_at": f"{(day + timedelta(days=1)).isoformat()}T00:00:00Z", "results": [
                             {"model": model, "uncached_input_tokens": uncached - uncached // 4,
                              "cache_creation": {"ephemeral_5m_input_tokens": uncached // 4,
                                                 "ephemeral_1h_input_tokens": 0},
                              "cache_read_input_tokens": cached, "output_tokens": output,
                              "server_tool_use": {"web_search_requests": 0}}
                             for model, (_n, uncached, output, cached) in self._results(day)]})
        return JSONResponse({"data": data, "has_more": following is not None,
                             "next_page": following.isoformat() if following else None})
