"""Fuzz the live gateway against its OpenAPI document (schemathesis), and the validators behind it (hypothesis)."""

from __future__ import annotations

import asyncio
import re
import unicodedata
from collections import Counter
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.core.parameters import ParameterLocation
from schemathesis.specs.openapi.checks import (
    allow_header_conformance,
    content_type_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from llm_proxy.errors import BadRequest
from llm_proxy.manage.openapi import build_document
from llm_proxy.manage.validation import MAX_GRACE_SECONDS, Field, query_int, query_timestamp, validate
from llm_proxy.settings import Settings
from tests.fakes import Gateway
from tests.manage.test_openapi import app_routes, documented_routes

# Per operation and generation mode, on top of schemathesis' deterministic boundary ("coverage")
# cases; the whole module runs in about 20 s on two cores.
EXAMPLES = 25
OPERATIONS = sorted(documented_routes(build_document()), key=lambda route: (route[1], route[0]))


# ---- the document against the live gateway ----

def openai_error_shape(ctx: Any, response: Any, case: Case) -> bool | None:
    """Every error is `{"error": {"message", "type", "code"[, "param"]}}`, all strings, and nothing more."""
    if response.status_code < 400:
        return None
    document = orjson.loads(response.content)
    assert isinstance(document, dict) and set(document) == {"error"}, document
    error = document["error"]
    assert isinstance(error, dict) and {"message", "type", "code"} <= set(error) <= {"message", "type", "code",
                                                                                      "param"}, error
    assert all(isinstance(value, str) for value in error.values()) and error["message"] and error["code"], error
    return None


def valid_data_accepted(ctx: Any, response: Any, case: Case) -> bool | None:
    """positive_data_acceptance, except where the document promises no success (DELETE /manage/projects/{id})."""
    if not any(status.startswith("2") for status in case.operation.definition.raw["responses"]):
        return None
    return positive_data_acceptance(ctx, response, case)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, valid_data_accepted, unsupported_method,
          allow_header_conformance, openai_error_shape]


class Fuzzer:
    """Send one operation's cases to a live gateway and collect every distinct failure and the statuses seen."""

    def __init__(self, gateway: Gateway, real_ids: dict[str, list[str]]) -> None:
        self.base_url = str(gateway.client.make_url("")).rstrip("/")
        self.headers = gateway.auth
        self.real_ids = real_ids
        self.failures: dict[str, str] = {}
        self.statuses: Counter[int] = Counter()

    def run(self, operation: Any, negatable: bool) -> None:
        """Boundary cases first, then random ones: positive, and negative when there is anything to make invalid."""
        schema = operation.schema
        modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE] if negatable else [GenerationMode.POSITIVE]
        coverage = schema.iter_coverage_cases(operation, generation_modes=modes, generation_config=(
            schema.config.generation_for(operation=operation, phase="coverage")))
        for index, case in enumerate(coverage):
            self.send(case, index % 4)
        for mode in modes:
            self.generate(operation, mode)

    def generate(self, operation: Any, mode: GenerationMode) -> None:
        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode), pick=st.integers(min_value=0, max_value=3))
        def generated(case: Case, pick: int) -> None:
            self.send(case, pick)

        generated()

    def send(self, case: Case, pick: int) -> None:
        if case.meta is not None and not case.meta.is_negative_at(ParameterLocation.PATH):
            self.make_real(case, pick, case.meta.generation.mode is GenerationMode.POSITIVE)
        try:
            response = case.call_and_validate(base_url=self.base_url, headers=self.headers, checks=CHECKS)
        except FailureGroup as group:
            for failure in group.exceptions:
                curl = case.as_curl_command(headers=self.headers, base_url=self.base_url)
                self.failures.setdefault(failure.title, f"{case.operation.label}: {failure.title}: "
                                                        f"{failure.message}\n    {curl}")
            return
        self.statuses[response.status_code] += 1

    def make_real(self, case: Case, pick: int, valid: bool) -> None:
        """Aim half the cases at a real project or token (a random id only ever reaches 404, before the body or
        query is looked at); in valid bodies, send integral floats as integers (see
        test_an_integral_float_is_an_integer)."""
        if pick < 2 and "id" in case.path_parameters:
            kind = "tokens" if case.operation.path.startswith("/manage/tokens/") else "projects"
            case.path_parameters = {**case.path_parameters, "id": self.real_ids[kind][pick]}
        if valid and isinstance(case.body, dict):
            body: Any = {name: int(value) if isinstance(value, float) else value for name, value in case.body.items()}
            if pick < 2 and "project_id" in body:
                body["project_id"] = self.real_ids["projects"][pick]
            case.body = body


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{method} {path}" for method, path in OPERATIONS])
async def test_operation_answers_as_documented(make_gateway: Callable[..., Any], method: str, path: str) -> None:
    # Cases without a valid Authorization header count as failed logins; a blocked address would hide the rest.
    gateway: Gateway = await make_gateway(IP_RATE_LIMIT="0")
    if (method, path) not in app_routes(gateway.app):
        pytest.skip("documented but not routed (test_openapi reports it)")
    projects = [await gateway.project(), await gateway.project()]
    tokens = [await gateway.token(projects[0]["id"]), await gateway.token(projects[1]["id"])]
    fuzzer = Fuzzer(gateway, {"projects": [p["id"] for p in projects], "tokens": [t["id"] for t in tokens]})
    document = build_document(gateway.settings)
    definition = document["paths"][path][method.lower()]
    operation = schemathesis.openapi.from_dict(document)[path][method]
    # Undeclared query parameters are ignored (only /manage/audit refuses them), which OpenAPI cannot say.
    operation.schema.config.generation.update(with_security_parameters=False, allow_extra_parameters=False)

    # The gateway serves on this event loop, so the blocking client runs in a thread.
    await asyncio.to_thread(fuzzer.run, operation, "requestBody" in definition or "parameters" in definition)

    assert not fuzzer.failures, "\n".join(fuzzer.failures.values())
    if any(status.startswith("2") for status in definition["responses"]):
        assert any(200 <= status < 300 for status in fuzzer.statuses), fuzzer.statuses


# ---- findings: production behaviour the document (or the validator's own contract) disagrees with ----

@pytest.mark.parametrize("query", ["limit=%C2%B2", "before=%C2%B2", "before=" + "9" * 5000])
async def test_a_non_decimal_digit_in_an_integer_query_is_400(gateway: Gateway, query: str) -> None:
    response = await gateway.client.get(f"/manage/audit?{query}", headers=gateway.auth)
    assert response.status == 400, await response.text()


async def test_a_timestamp_with_non_ascii_digits_is_400(gateway: Gateway) -> None:
    project = await gateway.project()
    response = await gateway.client.get(f"/manage/projects/{project['id']}/usage",
                                        params={"since": "١٢٣٤-01-01"}, headers=gateway.auth)
    assert response.status == 400, await response.text()


async def test_an_integral_float_is_an_integer(gateway: Gateway) -> None:
    project = await gateway.project()
    response = await gateway.client.post("/manage/tokens", data=b'{"project_id": "%s", "duration_minutes": 60.0}'
                                         % project["id"].encode(), headers=gateway.auth)
    assert response.status == 201, await response.text()


# ---- the validators against reference models (hypothesis) ----

# Every field rule the management handlers use, with the document's maximum token duration.
FIELDS = {
    "name": Field(str, required=True, max_length=200),
    "api_key": Field(str, max_length=4096),
    "project_id": Field(str, required=True, max_length=64),
    "limit": Field(int, nullable=True, minimum=0, maximum=2**53),
    "duration_minutes": Field(int, minimum=1, maximum=Settings((), b"").max_token_duration_minutes),
    "grace_seconds": Field(int, minimum=0, maximum=MAX_GRACE_SECONDS),
    "is_active": Field(bool),
}
# Characters the string rules turn on: whitespace str.strip() removes, controls, and ordinary text.
TRICKY = st.sampled_from("\t\n\x0b\x1c\x1f \x85\xa0\u2000\u3000\x00\x01\x7f\x80\x9faZ\u00e9\U0001f600"
                         "\u2028\u202e\u2066\u200f\u200d")
TRICKY_TEXT = st.text(TRICKY, max_size=8)


def json_values() -> st.SearchStrategy[Any]:
    scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text() | TRICKY_TEXT)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=6)


def near_bounds(spec: Field) -> st.SearchStrategy[Any]:
    """Values where rules are easiest to get wrong: integers around the bounds, strings around the length limit."""
    if spec.max_length is None:
        return st.sampled_from([bound + delta for bound in (spec.minimum, spec.maximum, 0) if bound is not None
                                for delta in (-1, 0, 1)])
    return st.builds(lambda size, pad, inner: pad + "x" * size + inner + pad,
                     st.sampled_from([spec.max_length - 1, spec.max_length, spec.max_length + 1]),
                     st.sampled_from(["", " ", "\t\u3000"]), TRICKY_TEXT)


def _unprintable(ch: str) -> bool:
    """The README's list: control characters (C0, DEL, C1), line separators, bidi overrides and isolates."""
    return (unicodedata.category(ch) == "Cc" or ch in "\u2028\u2029\u061c\u200e\u200f"
            or "\u202a" <= ch <= "\u202e" or "\u2066" <= ch <= "\u2069")


def expected(value: Any, spec: Field) -> tuple[bool, Any]:
    """The rule as the README states it: (accepted, the value kept)."""
    if value is None:
        return spec.nullable, None
    if spec.kind is int and type(value) is float and value.is_integer():
        value = int(value)  # JSON has one number type: 60.0 is the integer 60, as JSON Schema says
    if type(value) is not spec.kind:
        return False, None
    if isinstance(value, str):
        kept = value.strip()
        fits = spec.max_length is None or len(kept) <= spec.max_length
        return bool(kept) and fits and not any(_unprintable(ch) for ch in kept), kept
    if isinstance(value, int) and not isinstance(value, bool):
        low, high = spec.minimum, spec.maximum
        return (low is None or value >= low) and (high is None or value <= high), value
    return True, value


@pytest.mark.parametrize("name", FIELDS)
@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_validate_accepts_exactly_the_values_its_rule_allows(name: str, data: st.DataObject) -> None:
    spec = FIELDS[name]
    value = data.draw(json_values() | near_bounds(spec))
    accepted, kept = expected(value, spec)
    try:
        clean = validate({name: value}, {name: spec})
    except BadRequest as exc:
        assert not accepted, (value, exc.message)
        assert exc.param == name
    else:
        assert accepted, value
        assert clean == {name: kept} and type(clean[name]) is type(kept)


@settings(max_examples=100, derandomize=True, database=None, deadline=None)
@given(body=st.dictionaries(st.sampled_from([*FIELDS, "unknown", ""]), json_values(), max_size=4),
       require_any=st.booleans())
def test_validate_refuses_unknown_and_missing_fields_naming_them(body: dict[str, Any], require_any: bool) -> None:
    try:
        validate(body, FIELDS, require_any=require_any)
    except BadRequest as exc:
        unknown = [name for name in body if name not in FIELDS]
        missing = [name for name, spec in FIELDS.items() if spec.required and name not in body]
        if unknown:
            assert exc.param == unknown[0]
        elif missing:
            assert exc.param == missing[0]
        elif not body:
            assert require_any and exc.param is None
        else:
            assert exc.param in body and not expected(body[exc.param], FIELDS[exc.param])[0]
    else:
        assert all(name in FIELDS for name in body) and all(expected(value, FIELDS[name])[0]
                                                            for name, value in body.items())


def _body_schema(method: str, path: str) -> dict[str, Any]:
    schema: dict[str, Any] = build_document()["paths"][path][method]["requestBody"]["content"]["application/json"][
        "schema"]
    return schema


@pytest.mark.parametrize(("path", "method", "field", "limit"), [
    ("/manage/projects", "post", "name", 200), ("/manage/projects", "post", "api_key", 4096),
    ("/manage/tokens", "post", "project_id", 64)])
@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(data=st.data())
def test_document_text_pattern_is_the_validator_rule(path: str, method: str, field: str, limit: int,
                                                     data: st.DataObject) -> None:
    pattern = re.compile(_body_schema(method, path)["properties"][field]["pattern"])
    value = data.draw(TRICKY_TEXT | near_bounds(Field(str, max_length=limit)))
    assert (pattern.search(value) is not None) is expected(value, Field(str, max_length=limit))[0], value


def _timestamp_accepted(raw: str) -> bool:
    try:
        return query_timestamp({"t": raw}, "t") is not None or raw == ""
    except BadRequest:
        return False


DIGITS = st.text("0123456789", min_size=1, max_size=2)
TIMESTAMPS = (st.dates().map(str) | st.datetimes().map(lambda moment: moment.strftime("%Y-%m-%dT%H:%M:%SZ"))
              | st.builds("{}{}-{}-{}{}".format, st.sampled_from(["", "0", "1", "2"]), st.integers(0, 9999),
                          DIGITS, DIGITS, st.sampled_from(["", "T23:59:59Z", "T24:00:00Z", "T12:60:00Z", "Z", " "]))
              | st.text("0123456789-:TZ ", max_size=22))


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(raw=TIMESTAMPS)
@example("2024-02-29")
@example("2023-02-29")
@example("1900-02-29")
@example("2000-02-29")
@example("0000-01-01")
@example("")
def test_document_timestamp_pattern_is_the_query_rule(raw: str) -> None:
    schema = next(parameter["schema"] for parameter in build_document()["paths"]["/manage/audit"]["get"]["parameters"]
                  if parameter["name"] == "since")
    assert (re.search(schema["pattern"], raw) is not None) is _timestamp_accepted(raw), raw


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(raw=st.text(max_size=6) | st.integers(-5, 2000).map(str))
@example("²")
@example("9" * 5000)
def test_query_int_answers_an_integer_in_bounds_or_400(raw: str) -> None:
    try:
        value = query_int({"n": raw}, "n", default=7, minimum=1, maximum=1000)
    except BadRequest as exc:
        assert exc.param == "n"
    else:
        assert value == 7 if raw == "" else (raw.isascii() and 1 <= int(raw) <= 1000 and value == int(raw))
