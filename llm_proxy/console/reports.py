"""The console's read-only pages: Overview, Usage (with its CSV) and Audit (with the chain's verification)."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime, timedelta
from typing import Any

from aiohttp import web

from llm_proxy.audit.chain import TIMESTAMP_FORMAT
from llm_proxy.audit.verify import verify_table
from llm_proxy.audit.writer import AuditWriter
from llm_proxy.console.charts import DayUsage, HourBucket, status_chart, usage_chart
from llm_proxy.console.pages import page
from llm_proxy.errors import BadRequest
from llm_proxy.manage.validation import query_int, query_timestamp
from llm_proxy.storage.base import Store
from llm_proxy.tokens.cache import TokenCache
from llm_proxy.tokens.service import TokenService

AUDIT_PAGE = 50
USAGE_DAYS = (7, 30, 90)
_USAGE_COLUMNS = ("day", "requests", "prompt_tokens", "completion_tokens", "total_tokens")


class Reports:
    """Overview, Usage and Audit."""

    def __init__(self, service: TokenService, store: Store, cache: TokenCache, audit: AuditWriter) -> None:
        self._service = service
        self._store = store
        self._cache = cache
        self._audit = audit

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/", self.overview, allow_head=False),
            web.get("/usage", self.usage, allow_head=False),
            web.get("/usage.csv", self.usage_csv, allow_head=False),
            web.get("/audit", self.audit_events, allow_head=False),
            web.get("/audit/verify", self.verify, allow_head=False),
        ]

    async def overview(self, request: web.Request) -> web.StreamResponse:
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        first_hour = now - timedelta(hours=23)
        await self._audit.flush()
        counts = await self._store.audit.hourly_status(first_hour.strftime(TIMESTAMP_FORMAT))
        hours = [(first_hour + timedelta(hours=n)).strftime("%Y-%m-%dT%H") for n in range(24)]
        by_hour: dict[str, dict[str, int]] = {hour: {} for hour in hours}
        for hour, status_class, count in counts:
            if hour in by_hour:
                name = f"{status_class}xx" if status_class in (2, 3, 4, 5) else "other"
                by_hour[hour][name] = by_hour[hour].get(name, 0) + count
        projects = await self._service.projects()
        tokens = await self._service.tokens(active_only=True)
        await self._cache.flush()
        spent = sum(int((self._cache.overlay(token) or {}).get("total_tokens") or token.total_tokens)
                    for token in tokens)
        denials = await self._store.audit.query(filters={"result": "denied"}, since=None, until=None, before=None,
                                                limit=10)
        anomalies = await self._store.audit.query(filters={"action": "token.anomaly"}, since=None, until=None,
                                                  before=None, limit=5)
        heads = await self._store.audit.heads()
        chart = status_chart([HourBucket(datetime.strptime(hour, "%Y-%m-%dT%H").replace(tzinfo=UTC), classes)
                              for hour, classes in by_hour.items()], now=now, id_prefix="requests-chart")
        return page(request, "overview.html", {
            "chart": chart, "hours": [(hour, by_hour[hour]) for hour in hours],
            "requests_24h": sum(sum(classes.values()) for classes in by_hour.values()),
            "active_projects": sum(1 for project in projects if project.is_active), "projects": len(projects),
            "active_tokens": len(tokens), "tokens_spent": spent,
            "denials": [event for _, event in denials], "anomalies": [event for _, event in anomalies],
            "chains": sorted(heads.items())})

    async def usage(self, request: web.Request) -> web.StreamResponse:
        projects = await self._service.projects()
        project_id = request.query.get("project_id") or (projects[0].id if projects else None)
        days = query_int(request.query, "days", default=30, minimum=1, maximum=366) or 30
        context: dict[str, Any] = {"projects": projects, "project": None, "days": days, "day_choices": USAGE_DAYS}
        if project_id is not None:
            project = context["project"] = await self._service.project(project_id)
            rows = context["rows"] = await self._daily(project_id, days)
            context["totals"] = {key: sum(row[key] for row in rows) for key in _USAGE_COLUMNS[1:]}
            context["chart"] = usage_chart([DayUsage(date.fromisoformat(row["day"]), row["requests"],
                                                     row["total_tokens"]) for row in rows],
                                           project=project.name, id_prefix="usage-chart")
        return page(request, "usage.html", context)

    async def usage_csv(self, request: web.Request) -> web.StreamResponse:
        project_id = request.query.get("project_id")
        if not project_id:
            raise BadRequest("choose a project", param="project_id")
        project = await self._service.project(project_id)
        days = query_int(request.query, "days", default=30, minimum=1, maximum=366) or 30
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(_USAGE_COLUMNS)
        for row in await self._daily(project.id, days):
            writer.writerow([row[key] for key in _USAGE_COLUMNS])
        return web.Response(text=out.getvalue(), content_type="text/csv", headers={
            "Content-Disposition": f'attachment; filename="usage-{project.id}-{days}d.csv"'})

    async def _daily(self, project_id: str, days: int) -> list[dict[str, Any]]:
        """One row per day of the last `days` (today included), zeros where nothing was used."""
        await self._cache.flush()  # what is still only in memory
        today = datetime.now(UTC).date()
        first = today - timedelta(days=days - 1)
        stored = {row["date"]: row for row in await self._store.usage.daily(project_id, first.isoformat(), None)}
        empty = dict.fromkeys(_USAGE_COLUMNS[1:], 0)
        return [{"day": day, **{key: stored.get(day, empty)[key] for key in _USAGE_COLUMNS[1:]}}
                for day in ((first + timedelta(days=n)).isoformat() for n in range(days))]

    async def audit_events(self, request: web.Request) -> web.StreamResponse:
        filters = {name: request.query[name] for name in ("action", "project_id", "result") if request.query.get(name)}
        before = query_int(request.query, "before", default=None, minimum=1, maximum=2**62)
        since, until = query_timestamp(request.query, "since"), query_timestamp(request.query, "until")
        await self._audit.flush()
        listed = await self._store.audit.query(filters=filters, since=since, until=until, before=before,
                                               limit=AUDIT_PAGE)
        next_before = listed[-1][0] if len(listed) == AUDIT_PAGE else None
        query = {**filters, **({"since": request.query["since"]} if since else {}),
                 **({"until": request.query["until"]} if until else {})}
        return page(request, "audit.html", {"events": listed, "filters": filters, "query": query,
                                            "since": request.query.get("since", ""),
                                            "until": request.query.get("until", ""), "next_before": next_before,
                                            "first_page": before is None})

    async def verify(self, request: web.Request) -> web.StreamResponse:
        await self._audit.flush()
        heads = await self._store.audit.heads()
        result = await verify_table(self._store.audit, heads=heads, growing=True)
        return page(request, "verify.html", {"result": result, "chains": sorted(result.chains.items())})
