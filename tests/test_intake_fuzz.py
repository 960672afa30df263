"""Property-based abuse of the intake: thousands of malformed next_visit bodies.

Whatever comes in, the intake answers 413 or 422 with the error shape, never a 5xx, never
crashes, and enqueues nothing (the broker's lists and the ledger stay empty). Hypothesis
draws the bodies; schemathesis drives every operation of the OpenAPI spec as well. The
TestClient re-raises any exception of the app, so a crash fails the test.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from prompt_tasks.errors import InvalidVisit
from prompt_tasks.intake.http import create_api
from prompt_tasks.intake.stream import parse_message
from prompt_tasks.model.visit import NextVisit, parse_next_visit
from prompt_tasks.settings import Settings
from prompt_tasks.store.keys import STREAM_PREFIX
from tests.test_intake import queued, visit_body, visits_in_ledger


def base() -> dict[str, Any]:
    """A valid body, always the same (strategies must not depend on the clock)."""
    return visit_body(startTime=1795568430.0)

FUZZ = hsettings(
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large, HealthCheck.filter_too_much],
)

# --- strategies ------------------------------------------------------------------------------------

scalars = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(10**40), max_value=10**40)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
REQUIRED = ("instrument", "groupId", "startTime")


def _is_number(text: str) -> bool:
    try:
        value = float(text)
    except ValueError:
        return False
    return math.isfinite(value)


not_numbers = json_values.filter(
    lambda v: not (isinstance(v, int | float) and not isinstance(v, bool))
    and not (isinstance(v, str) and _is_number(v))
)
not_strings = json_values.filter(lambda v: not isinstance(v, str))
non_finite = st.sampled_from([math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity"])

#: Per field, values that can never be valid.
BAD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "instrument": not_strings
    | st.text(max_size=20).filter(lambda s: not s[:1].isalpha() or not s.isascii())
    | st.text(min_size=65, max_size=300)
    | st.from_regex(r"\A[A-Za-z]+[ /:.][A-Za-z]*\Z"),
    "groupId": not_strings
    | st.text(max_size=20).map(lambda s: s + "/x")
    | st.text(max_size=20).map(lambda s: "a b" + s)
    | st.just("")
    | st.text(min_size=129, max_size=500).map(lambda s: "g" * 129 + s),
    "startTime": not_numbers | non_finite | st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
    | st.floats(min_value=4.2e9, allow_nan=False, allow_infinity=False),
    "nimages": not_numbers | st.integers(max_value=-1) | st.integers(min_value=1001)
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    "duration": not_numbers | non_finite | st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False)
    | st.floats(min_value=86_401, allow_nan=False, allow_infinity=False),
    "cameraAngle": not_numbers | non_finite,
    "salIndex": not_numbers | st.integers(max_value=-1) | st.integers(min_value=2**31),
    "coordinateSystem": st.sampled_from([3, 4, "OBSERVED", "MOUNT", 0, 5, -1, "GALACTIC", 2.5, True, None]),
    "rotationSystem": st.sampled_from([3, 4, "HORIZON", "MOUNT", 0, 9, "SIDEWAYS", [], {}]),
    "dome": st.sampled_from([0, 4, "AJAR", 1.5, None, [1]]),
    "position": st.lists(st.floats(min_value=91, max_value=1e6), min_size=2, max_size=2).map(lambda p: [10.0, p[1]])
    | st.lists(st.floats(allow_nan=False), min_size=3, max_size=5)
    | st.lists(st.floats(allow_nan=False), min_size=1, max_size=1)
    | st.text(max_size=30).filter(lambda s: not s.strip().startswith("["))
    | st.dictionaries(st.text(max_size=5), scalars, max_size=3)
    | st.tuples(non_finite, st.just(0.0)).map(list),
    "filters": not_strings | st.text(min_size=65, max_size=200),
    "survey": not_strings | st.text(min_size=129, max_size=400),
    "detector": st.integers(max_value=-1) | st.integers(min_value=10_000) | st.text(max_size=5).filter(
        lambda s: not re.fullmatch(r"\s*[+-]?\d+\s*", s)
    ),
}


@st.composite
def one_bad_field(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one field (or more) replaced by a value that can never be valid."""
    body = base()
    for name in draw(st.lists(st.sampled_from(sorted(BAD_VALUES)), min_size=1, max_size=3, unique=True)):
        body[name] = draw(BAD_VALUES[name])
    return body


@st.composite
def missing_required(draw: st.DrawFn) -> dict[str, Any]:
    """A body without one or more required fields, and random extra fields."""
    body = base()
    for name in draw(st.lists(st.sampled_from(REQUIRED), min_size=1, unique=True)):
        body.pop(name, None)
    for name in draw(st.lists(st.sampled_from(sorted(set(NextVisit.model_fields) - set(REQUIRED))), unique=True)):
        body.pop(name, None)
    extra = draw(st.dictionaries(st.text(max_size=15), json_values, max_size=5))
    body.update({k: v for k, v in extra.items() if k not in NextVisit.model_fields})
    return body


not_objects = json_values.filter(lambda v: not isinstance(v, dict))


def _dump(value: Any) -> bytes:
    return json.dumps(value).encode()


@st.composite
def garbage_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that are not a JSON object: random, truncated JSON, invalid UTF-8, deep nesting."""
    kind = draw(st.sampled_from(["random", "truncated", "utf8", "deep", "digits", "wrapped"]))
    if kind == "random":
        data = draw(st.binary(max_size=300))
        return data if not data.strip().startswith(b"{") else b"[" + data
    if kind == "truncated":
        text = _dump(base())
        return text[: draw(st.integers(min_value=0, max_value=len(text) - 1))]
    if kind == "utf8":
        return b'{"instrument": "Sim\xff\xfeCam", "groupId": "\xc3\x28"}'
    if kind == "deep":
        depth = draw(st.integers(min_value=500, max_value=20_000))
        opener = draw(st.sampled_from([b"[", b'{"a":', b'{"groupId":[']))
        return opener * depth
    if kind == "digits":
        return b'{"instrument": "SimCam", "groupId": "g", "startTime": ' + b"9" * draw(
            st.integers(min_value=4300, max_value=20_000)) + b"}"
    return _dump(draw(not_objects))


malformed_bodies = (
    one_bad_field().map(_dump) | missing_required().map(_dump) | not_objects.map(_dump) | garbage_bytes()
)


# --- tests ---------------------------------------------------------------------------------------


@pytest.fixture
def api(settings: Settings, celery_app: Celery) -> Iterator[TestClient]:
    with TestClient(create_api(settings, celery_app)) as client:
        yield client


def _assert_rejected(response: Any) -> None:
    assert response.status_code in (413, 422), (response.status_code, response.text[:300])
    answer = response.json()
    assert answer["code"] in ("invalid_visit", "body_too_large")
    assert answer["errors"] and all({"field", "reason"} <= set(e) for e in answer["errors"])


def test_malformed_bodies_are_rejected_and_nothing_is_enqueued(api: TestClient, rdb: redis.Redis) -> None:
    seen = {"count": 0}

    @hsettings(FUZZ, max_examples=1000)
    @given(body=malformed_bodies)
    def throw(body: bytes) -> None:
        seen["count"] += 1
        _assert_rejected(api.post("/next-visit", content=body, headers={"Content-Type": "application/json"}))

    throw()
    assert seen["count"] >= 1000
    assert queued(rdb) == {}
    assert visits_in_ledger(rdb) == 0


def test_huge_bodies_are_413(api: TestClient, settings: Settings, rdb: redis.Redis) -> None:
    @hsettings(FUZZ, max_examples=30)
    @given(extra=st.integers(min_value=1, max_value=4 * settings.intake_max_body),
           filler=st.sampled_from([b" ", b"x", b"[", b"\xff"]))
    def throw(extra: int, filler: bytes) -> None:
        body = _dump(base())
        body += filler * (settings.intake_max_body - len(body) + extra)
        response = api.post("/next-visit", content=body)
        assert response.status_code == 413
        assert response.json()["code"] == "body_too_large"

    throw()
    assert queued(rdb) == {}


def test_garbage_headers_and_methods(api: TestClient, rdb: redis.Redis) -> None:
    @hsettings(FUZZ, max_examples=150)
    @given(
        content_type=st.sampled_from(["application/json", "text/plain", "", "multipart/form-data; boundary=x",
                                      "application/x-www-form-urlencoded", "application/json; charset=latin-1"]),
        body=malformed_bodies,
        method=st.sampled_from(["post", "put", "patch", "delete", "get"]),
    )
    def throw(content_type: str, body: bytes, method: str) -> None:
        if method == "post":
            response = api.post("/next-visit", content=body, headers={"Content-Type": content_type})
            _assert_rejected(response)
        else:
            response = api.request(method.upper(), "/next-visit", content=body)
            assert response.status_code == 405

    throw()
    assert queued(rdb) == {}


def test_stream_messages_never_crash_the_parser() -> None:
    fields = st.dictionaries(
        st.text(max_size=15) | st.binary(max_size=15) | st.sampled_from(sorted(NextVisit.model_fields)),
        st.text(max_size=40) | st.binary(max_size=40),
        max_size=20,
    )

    @hsettings(FUZZ, max_examples=800)
    @given(fields=fields)
    def throw(fields: dict[Any, Any]) -> None:
        try:
            message = parse_message(f"{STREAM_PREFIX}SimCam", "1-0", fields)
        except InvalidVisit as exc:
            assert exc.errors
        else:
            assert message.detector >= 0 and message.visit.detector is None

    throw()


def test_parser_agrees_with_the_api(api: TestClient, rdb: redis.Redis) -> None:
    """Whatever the body, the intake accepts it exactly when the model does."""

    @hsettings(FUZZ, max_examples=300)
    @given(body=malformed_bodies | one_bad_field().map(_dump))
    def throw(body: bytes) -> None:
        try:
            parse_next_visit(body)
        except InvalidVisit:
            _assert_rejected(api.post("/next-visit", content=body))
        else:  # pragma: no cover - the strategies only make invalid bodies
            pytest.fail(f"strategy produced a valid body: {body[:200]!r}")

    throw()
    assert visits_in_ledger(rdb) == 0


def test_schemathesis_against_the_spec(api: TestClient, rdb: redis.Redis) -> None:
    """Every operation of the OpenAPI spec, fed schema-violating and schema-following input:
    no 5xx, errors in the documented shape, and a rejected next_visit enqueues nothing."""
    schemathesis = pytest.importorskip("schemathesis")
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_dict(api.get("/openapi.json").json())
    strategy = st.one_of(
        schema.as_strategy(generation_mode=GenerationMode.NEGATIVE),
        schema.as_strategy(generation_mode=GenerationMode.POSITIVE),
    )
    statuses: dict[int, int] = {}

    @hsettings(FUZZ, max_examples=80)
    @given(case=strategy)
    def throw(case: Any) -> None:
        kwargs = case.as_transport_kwargs(base_url="http://testserver")
        before = (queued(rdb), visits_in_ledger(rdb))
        response = api.request(
            kwargs["method"], kwargs["url"], headers=kwargs.get("headers"), params=kwargs.get("params"),
            content=_content(kwargs),
        )
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, response.text[:300])
        if response.status_code >= 400 and response.status_code != 405:
            assert "code" in response.json() or "detail" in response.json()
        if case.path == "/next-visit" and response.status_code >= 400:
            assert (queued(rdb), visits_in_ledger(rdb)) == before

    throw()
    assert any(400 <= status < 500 for status in statuses), statuses


def _content(kwargs: dict[str, Any]) -> bytes | None:
    if "json" in kwargs:
        return json.dumps(kwargs["json"], allow_nan=True).encode()
    data = kwargs.get("data") or kwargs.get("content")
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes):
        return data
    return None
