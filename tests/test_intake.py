"""The HTTP intake: 202/200/413/422, auth, idempotency, ledger, abort, health, CLI, process.

In-process tests drive the FastAPI app with TestClient against the private Redis and a real
Celery app (no worker consumes, so what the router publishes stays in the broker's lists and
can be counted). One test runs ``prompt-tasks intake`` as a real uvicorn process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from celery import Celery
from click.testing import CliRunner
from fastapi.testclient import TestClient
from pydantic import SecretStr

from prompt_tasks.errors import (
    BadRaw,
    InvalidEvent,
    InvalidVisit,
    PermanentError,
    PipelineError,
    PromptTasksError,
    RetryLater,
)
from prompt_tasks.intake.client import IntakeClient, Outcome, split_events
from prompt_tasks.intake.errors import (
    ERROR_TABLE,
    BodyTooLarge,
    Unauthorized,
    UnknownVisit,
    error_body,
    http_error,
)
from prompt_tasks.intake.http import create_api
from prompt_tasks.model.visit import tai_now
from prompt_tasks.settings import Settings
from prompt_tasks.stack.env import child_env
from prompt_tasks.store import ledger
from prompt_tasks.store.arrivals import is_aborted
from prompt_tasks.store.keys import VISITS_RECENT

GROUP = "2026-11-24T01:00:00.000"
TOKEN = "t0ken-never-logged-8c1f"


def visit_body(group: str = GROUP, **overrides: Any) -> dict[str, Any]:
    """A valid summit-form next_visit of SimCam."""
    body: dict[str, Any] = {
        "private_sndStamp": 1795568400.0,
        "salIndex": 1,
        "scriptSalIndex": 7,
        "instrument": "SimCam",
        "groupId": group,
        "coordinateSystem": 2,
        "position": [150.0, 2.0],
        "startTime": tai_now() + 30,
        "rotationSystem": 2,
        "cameraAngle": 0.0,
        "filters": "r",
        "dome": 2,
        "duration": 30.0,
        "nimages": 1,
        "survey": "TEST",
        "totalCheckpoints": 0,
    }
    body.update(overrides)
    return body


def queued(client: redis.Redis) -> dict[str, int]:
    """Every non-empty Redis list of the broker database: queue (or list) → length."""
    out = {}
    for key in client.scan_iter(count=1000, _type="LIST"):
        name = key.decode() if isinstance(key, bytes) else key
        out[name] = client.llen(key)
    return {name: n for name, n in out.items() if n}


def visits_in_ledger(client: redis.Redis) -> int:
    """How many visits the ledger indexes."""
    return client.zcard(VISITS_RECENT)


@pytest.fixture
def api(settings: Settings, celery_app: Celery) -> Iterator[TestClient]:
    """The intake app without auth."""
    with TestClient(create_api(settings, celery_app)) as client:
        yield client


@pytest.fixture
def secured(settings: Settings, celery_app: Celery) -> Iterator[TestClient]:
    """The intake app with a bearer token."""
    locked = settings.model_copy(update={"intake_token": SecretStr(TOKEN)})
    with TestClient(create_api(locked, celery_app)) as client:
        yield client


# --- the error table -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (InvalidVisit("groupId: bad"), 422, "invalid_visit"),
        (BodyTooLarge("body: big"), 413, "body_too_large"),
        (InvalidEvent("x"), 422, "invalid_event"),
        (Unauthorized("x"), 401, "unauthorized"),
        (UnknownVisit("x"), 404, "unknown_visit"),
        (RetryLater("x"), 503, "unavailable"),
        (BadRaw("x"), 400, "permanent"),
        (PipelineError("x"), 400, "permanent"),
        (PermanentError("x"), 400, "permanent"),
        (PromptTasksError("x"), 500, "error"),
        (KeyError("secret"), 500, "internal"),
    ],
)
def test_error_table(error: Exception, status: int, code: str) -> None:
    assert http_error(error) == (status, code)
    body = error_body(error)
    assert body["code"] == code
    if not isinstance(error, PromptTasksError):
        assert "secret" not in json.dumps(body)


def test_error_table_codes_are_unique_per_class() -> None:
    codes = [code for _, code in ERROR_TABLE.values()]
    assert len(codes) == len(set(codes))


def test_error_body_splits_field_and_reason() -> None:
    body = error_body(InvalidVisit("instrument: unknown instrument Foo"))
    assert body["errors"] == [{"field": "instrument", "reason": "unknown instrument Foo"}]


# --- POST /next-visit ----------------------------------------------------------------------------


def test_accepts_a_visit_and_publishes_its_chord(api: TestClient, rdb: redis.Redis) -> None:
    response = api.post("/next-visit", json=visit_body())
    assert response.status_code == 202, response.text
    answer = response.json()
    assert answer["key"] == f"SimCam/{GROUP}"
    assert answer["duplicate"] is False
    detectors = answer["detectors"]
    assert detectors and all(isinstance(d, int) for d in detectors)
    record = ledger.read_visit(rdb, "SimCam", GROUP)
    assert record is not None and sorted(record.detectors) == detectors
    lists = queued(rdb)
    for det in detectors:
        assert lists.get(f"detector.SimCam.{det:03d}") == 1, lists
    assert lists.get("summary") == 1  # the deadline


def test_fan_out_form_over_http_starts_just_that_detector(api: TestClient, rdb: redis.Redis) -> None:
    body = {key: str(value) for key, value in visit_body().items()}
    body.update(position="[150.0, 2.0]", coordinateSystem="ICRS", rotationSystem="SKY", dome="OPEN", detector="4")
    response = api.post("/next-visit", content=json.dumps(body))
    assert response.status_code == 202, response.text
    assert response.json()["detectors"] == [4]
    assert queued(rdb).get("detector.SimCam.004") == 1


def test_duplicate_starts_one_visit(api: TestClient, rdb: redis.Redis) -> None:
    body = visit_body()
    first = api.post("/next-visit", json=body)
    assert first.status_code == 202
    before = queued(rdb)
    second = api.post("/next-visit", json={**body, "private_sndStamp": body["private_sndStamp"] + 1})
    assert second.status_code == 200, second.text
    assert second.json()["duplicate"] is True
    assert second.json()["key"] == first.json()["key"]
    assert queued(rdb) == before
    assert visits_in_ledger(rdb) == 1


def test_two_groups_are_two_visits(api: TestClient, rdb: redis.Redis) -> None:
    for group in (GROUP, "2026-11-24T01:01:00.000"):
        assert api.post("/next-visit", json=visit_body(group)).status_code == 202
    assert visits_in_ledger(rdb) == 2


def test_unknown_and_private_fields_are_ignored(api: TestClient) -> None:
    response = api.post("/next-visit", json=visit_body(private_identity="x", somethingNew=[1, {"a": None}]))
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({k: v for k, v in visit_body().items() if k != "groupId"}, "groupId"),
        (visit_body(coordinateSystem=3), "coordinateSystem"),
        (visit_body(coordinateSystem="MOUNT"), "coordinateSystem"),
        (visit_body(position=[10.0, 95.0]), "position"),
        (visit_body(nimages=-1), "nimages"),
        (visit_body(groupId="a/b"), "groupId"),
        (visit_body(startTime="tomorrow"), "startTime"),
        (visit_body(instrument="NoSuchCam"), "instrument"),
        ([visit_body()], "body"),
        ("just text", "body"),
    ],
)
def test_invalid_visit_is_422_naming_the_field(
    api: TestClient, rdb: redis.Redis, body: Any, field: str
) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    response = api.post("/next-visit", content=content)
    assert response.status_code == 422, response.text
    answer = response.json()
    assert answer["code"] == "invalid_visit"
    assert field in {e["field"].split(".")[0] for e in answer["errors"]}, answer
    if field == "coordinateSystem":
        assert "unsupported coordinate system" in answer["errors"][0]["reason"]
    assert queued(rdb) == {}
    assert visits_in_ledger(rdb) == 0


def test_body_over_the_limit_is_413(api: TestClient, settings: Settings, rdb: redis.Redis) -> None:
    huge = json.dumps(visit_body(survey="x" * settings.intake_max_body))
    response = api.post("/next-visit", content=huge)
    assert response.status_code == 413
    assert response.json()["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        for _ in range(settings.intake_max_body // 1000 + 2):
            yield b" " * 1000

    response = api.post("/next-visit", content=chunks())
    assert response.status_code == 413
    assert queued(rdb) == {}


def test_body_at_the_limit_is_parsed(api: TestClient, settings: Settings) -> None:
    body = json.dumps(visit_body())
    padded = body + " " * (settings.intake_max_body - len(body))
    assert len(padded) == settings.intake_max_body
    assert api.post("/next-visit", content=padded).status_code == 202


def test_broker_unreachable_is_503(settings: Settings, rdb: redis.Redis) -> None:
    from prompt_tasks.celery import create_app
    from prompt_tasks.stack.servers import free_port

    cut_off = settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{free_port()}/0"})
    app = create_app(cut_off)
    app.conf.broker_connection_timeout = 1
    app.conf.broker_transport_options = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    app.conf.task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.1}
    try:
        with TestClient(create_api(cut_off, app)) as client:
            response = client.post("/next-visit", json=visit_body())
            assert response.status_code == 503, response.text
            assert response.json()["code"] == "unavailable"
            health = client.get("/healthz").json()
            assert health == {"ok": False, "broker": False, "redis": True}
    finally:
        app.close()
    # The failed announcement left no half-made visit behind: it can be announced again.
    assert visits_in_ledger(rdb) == 0


def test_redis_unreachable_is_503(settings: Settings, celery_app: Celery, rdb: redis.Redis) -> None:
    from prompt_tasks.stack.servers import free_port

    cut_off = settings.model_copy(update={"event_redis_url": f"redis://127.0.0.1:{free_port()}/0"})
    with TestClient(create_api(cut_off, celery_app)) as client:
        for method, path in (("post", "/next-visit"), ("get", f"/visits/SimCam/{GROUP}"),
                             ("post", f"/visits/SimCam/{GROUP}/abort")):
            kwargs: dict[str, Any] = {"json": visit_body()} if path == "/next-visit" else {}
            response = getattr(client, method)(path, **kwargs)
            assert response.status_code == 503, (path, response.text)
            assert response.json()["code"] == "unavailable"
        assert client.get("/healthz").json() == {"ok": False, "broker": True, "redis": False}
    assert queued(rdb) == {}


# --- auth ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": TOKEN},
     {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": "Bearer "}],
)
def test_auth_refuses_without_the_token(secured: TestClient, rdb: redis.Redis, headers: dict[str, str]) -> None:
    for method, path in (("post", "/next-visit"), ("get", f"/visits/SimCam/{GROUP}"),
                         ("post", f"/visits/SimCam/{GROUP}/abort"), ("get", "/openapi.json")):
        kwargs: dict[str, Any] = {"headers": headers}
        if path == "/next-visit":
            kwargs["json"] = visit_body()
        response = getattr(secured, method)(path, **kwargs)
        assert response.status_code == 401, (path, response.text)
        assert response.json()["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"
        assert TOKEN not in response.text
    assert queued(rdb) == {}
    assert is_aborted(rdb, "SimCam", GROUP) is None


def test_auth_accepts_the_token(secured: TestClient) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert secured.post("/next-visit", json=visit_body(), headers=headers).status_code == 202
    assert secured.get(f"/visits/SimCam/{GROUP}", headers=headers).status_code == 200
    assert secured.get("/openapi.json", headers=headers).status_code == 200


def test_healthz_needs_no_token(secured: TestClient) -> None:
    response = secured.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"ok": True, "broker": True, "redis": True}


def test_auth_off_needs_no_header(api: TestClient) -> None:
    assert api.post("/next-visit", json=visit_body()).status_code == 202


def test_unauthenticated_huge_body_is_401_not_read(secured: TestClient, settings: Settings) -> None:
    response = secured.post("/next-visit", content=b"x" * (settings.intake_max_body * 2))
    assert response.status_code == 401


# --- ledger, abort, health, spec -----------------------------------------------------------------


def test_visit_record(api: TestClient) -> None:
    accepted = api.post("/next-visit", json=visit_body()).json()
    response = api.get(f"/visits/SimCam/{GROUP}")
    assert response.status_code == 200
    record = response.json()
    assert record["instrument"] == "SimCam" and record["group"] == GROUP
    assert sorted(int(d) for d in record["detectors"]) == accepted["detectors"]
    assert record["visit"]["groupId"] == GROUP
    assert record["received"] is not None and record["chord_id"]


def test_unknown_visit_is_404(api: TestClient) -> None:
    response = api.get("/visits/SimCam/2020-01-01T00:00:00.000")
    assert response.status_code == 404
    assert response.json()["code"] == "unknown_visit"


def test_bad_path_ids_are_422(api: TestClient) -> None:
    response = api.get("/visits/1Cam/x")
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "instrument"


def test_abort(api: TestClient, rdb: redis.Redis) -> None:
    api.post("/next-visit", json=visit_body())
    response = api.post(f"/visits/SimCam/{GROUP}/abort", params={"reason": "dome closed"})
    assert response.status_code == 202, response.text
    assert response.json()["known"] is True and response.json()["key"] == f"SimCam/{GROUP}"
    assert is_aborted(rdb, "SimCam", GROUP) == "dome closed"
    record = api.get(f"/visits/SimCam/{GROUP}").json()
    assert record["abort_reason"] == "dome closed" and record["aborted"] > 0


def test_abort_of_an_unknown_visit_still_ends_its_waits(api: TestClient, rdb: redis.Redis) -> None:
    response = api.post("/visits/SimCam/2026-11-24T02:00:00.000/abort")
    assert response.status_code == 202
    assert response.json()["known"] is False
    assert is_aborted(rdb, "SimCam", "2026-11-24T02:00:00.000") == "aborted"
    assert visits_in_ledger(rdb) == 0


def test_openapi_spec(api: TestClient) -> None:
    spec = api.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.")
    post = spec["paths"]["/next-visit"]["post"]
    ref = post["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/NextVisit"
    model = spec["components"]["schemas"]["NextVisit"]
    assert {"instrument", "groupId", "startTime"} <= set(model["required"])
    assert "CoordinateSystem" in spec["components"]["schemas"]
    assert {"202", "200", "413", "422"} <= set(post["responses"])
    assert "/visits/{instrument}/{group}" in spec["paths"]
    assert "/healthz" in spec["paths"]


# --- client and CLI ------------------------------------------------------------------------------


def test_split_events() -> None:
    one = json.dumps(visit_body())
    assert split_events(one) == [one]
    assert len(split_events(json.dumps([visit_body(), visit_body("g2")]))) == 2
    lines = split_events(f"{one}\n\n{json.dumps(visit_body('g2'))}\nnot json\n")
    assert len(lines) == 3 and lines[2] == "not json"
    assert split_events("  \n") == []


def test_outcome_description() -> None:
    assert Outcome(202, {"key": "A/b", "duplicate": False, "detectors": [1, 2]}).describe() == "A/b new (2 detectors)"
    assert "duplicate" in Outcome(200, {"key": "A/b", "duplicate": True, "detectors": [1]}).describe()
    text = Outcome(422, {"code": "invalid_visit", "errors": [{"field": "groupId", "reason": "Field required"}]}).describe()
    assert text == "rejected (422 invalid_visit): groupId: Field required"


def _events_file(tmp_path: Path, group: str = GROUP) -> Path:
    path = tmp_path / "events.jsonl"
    body = visit_body(group)
    lines = [json.dumps(body), json.dumps(body), json.dumps(visit_body("bad group")),
             json.dumps({**body, "nimages": 3})]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_next_visit_direct(settings: Settings, rdb: redis.Redis, tmp_path: Path) -> None:
    from prompt_tasks.cli import main

    result = CliRunner(env=child_env(settings)).invoke(main, ["next-visit", "--direct", str(_events_file(tmp_path))])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith(f"#1 SimCam/{GROUP} new")
    assert lines[1].startswith(f"#2 SimCam/{GROUP} duplicate")
    assert lines[2].startswith("#3 rejected (422 invalid_visit): groupId:")
    assert lines[3].startswith("#4 rejected (409 conflicting_visit): nimages:")
    assert visits_in_ledger(rdb) == 1


def test_cli_next_visit_all_accepted_exits_0(settings: Settings, rdb: redis.Redis, tmp_path: Path) -> None:
    from prompt_tasks.cli import main

    path = tmp_path / "one.json"
    path.write_text(json.dumps([visit_body("g1"), visit_body("g2")]))
    result = CliRunner(env=child_env(settings)).invoke(main, ["next-visit", "--direct", str(path)])
    assert result.exit_code == 0, result.output
    assert visits_in_ledger(rdb) == 2


# --- the real process ----------------------------------------------------------------------------


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"intake exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail("intake did not become healthy")


def test_intake_process(settings: Settings, rdb: redis.Redis, tmp_path: Path) -> None:
    """``prompt-tasks intake`` serves HTTP and the fan-out stream, and stops cleanly on SIGTERM."""
    from prompt_tasks.cli import main
    from prompt_tasks.stack.components import prompt_tasks_executable

    locked = settings.model_copy(update={"intake_token": SecretStr(TOKEN)})
    env = child_env(locked)
    url = f"http://{locked.host}:{locked.intake_port}"
    log_path = tmp_path / "intake.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [prompt_tasks_executable(), "intake", "--instrument", "SimCam", "--window", "0.3"],
            env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path,
        )
    try:
        _wait_healthy(url, proc)
        with IntakeClient(url, TOKEN) as client:
            body = json.dumps(visit_body())
            assert client.next_visit(body).status == 202
            assert client.next_visit(body).duplicate
            assert client.next_visit("{}").status == 422
            assert client.visit("SimCam", GROUP).status == 200
        with IntakeClient(url) as anonymous:
            assert anonymous.next_visit(json.dumps(visit_body("g9"))).status == 401

        # The CLI through HTTP, with the token from the settings.
        runner = CliRunner(env=env)
        result = runner.invoke(main, ["next-visit", str(_events_file(tmp_path, "2026-11-24T02:00:00.000"))])
        assert result.exit_code == 1
        assert "duplicate" in result.output and "rejected (422" in result.output
        result = runner.invoke(main, ["abort", "SimCam", GROUP, "--reason", "test"])
        assert result.exit_code == 0, result.output
        assert is_aborted(rdb, "SimCam", GROUP) == "test"

        # The fan-out stream: three detectors, one visit on exactly those three.
        group = "2026-11-24T03:00:00.000"
        fan = {k: str(v) for k, v in visit_body(group).items()}
        fan.update(position="[150.0, 2.0]")
        for det in (5, 1, 3):
            rdb.xadd("instrument:SimCam", {**fan, "detector": str(det)})
        deadline = time.monotonic() + 30
        record = None
        while time.monotonic() < deadline and record is None:
            record = ledger.read_visit(rdb, "SimCam", group)
            time.sleep(0.1)
        assert record is not None, "the stream's visit was never announced"
        assert sorted(record.detectors) == [1, 3, 5]

        # The fleet's metrics, on the metrics port.
        metrics = httpx.get(f"http://{locked.host}:{locked.metrics_port}/metrics", timeout=10)
        assert metrics.status_code == 200 and "prompt_tasks" in metrics.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("intake did not stop on SIGTERM")
    output = log_path.read_text()
    assert code == 0, output[-3000:]
    assert TOKEN not in output
    assert os.environ.get("PROMPT_TASKS_INTAKE_TOKEN") != TOKEN


def test_cli_next_visit_from_stdin(settings: Settings, rdb: redis.Redis) -> None:
    from prompt_tasks.cli import main

    lines = "\n".join(json.dumps(visit_body(f"2026-11-24T06:0{i}:00.000")) for i in range(3))
    result = CliRunner(env=child_env(settings)).invoke(main, ["next-visit", "--direct", "-"], input=lines)
    assert result.exit_code == 0, result.output
    assert [line.split()[2] for line in result.output.splitlines()] == ["new", "new", "new"]
    assert visits_in_ledger(rdb) == 3


def test_cli_without_an_intake_says_so(settings: Settings, tmp_path: Path) -> None:
    from prompt_tasks.cli import main
    from prompt_tasks.stack.servers import free_port

    path = tmp_path / "one.json"
    path.write_text(json.dumps(visit_body()))
    runner = CliRunner(env=child_env(settings))
    url = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(main, ["next-visit", str(path), "--url", url])
    assert result.exit_code == 1 and "intake unreachable" in result.output
    result = runner.invoke(main, ["abort", "SimCam", GROUP, "--url", url])
    assert result.exit_code == 1 and "intake unreachable" in result.output


# --- rejections leave a trace (issue 17) -------------------------------------------------


def test_duplicate_with_another_body_is_409_naming_what_differs(api: TestClient, rdb: redis.Redis) -> None:
    body = visit_body()
    assert api.post("/next-visit", json=body).status_code == 202
    before = queued(rdb)
    other = api.post("/next-visit", json={**body, "nimages": 2, "filters": "g"})
    assert other.status_code == 409, other.text
    assert other.json()["code"] == "conflicting_visit"
    assert sorted(e["field"] for e in other.json()["errors"]) == ["filters", "nimages"]
    assert queued(rdb) == before and visits_in_ledger(rdb) == 1


@pytest.mark.parametrize("field", ["filters", "survey", "groupId"])
def test_control_characters_are_refused_in_every_string_field(api: TestClient, field: str) -> None:
    response = api.post("/next-visit", json=visit_body(**{field: "r\x1b[31m\x00"}))
    assert response.status_code == 422, response.text
    assert [e["field"] for e in response.json()["errors"]] == [field]


def test_every_rejection_is_logged_and_counted(
    settings: Settings, celery_app: Celery, rdb: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    from prompt_tasks.fleet.prometheus import registry_for
    from prompt_tasks.store.metrics import read_counters

    locked = settings.model_copy(update={"intake_token": SecretStr(TOKEN), "intake_max_body": 4096})
    auth = {"Authorization": f"Bearer {TOKEN}"}
    secret_marker = "SECRET-BODY-7f3a"
    with caplog.at_level("INFO", logger="prompt_tasks.intake"), TestClient(create_api(locked, celery_app)) as client:
        assert client.post("/next-visit", json=visit_body()).status_code == 401
        assert client.post("/next-visit", json=visit_body(nimages=-1, survey=secret_marker),
                           headers=auth).status_code == 422
        assert client.post("/next-visit", content=b"{" + b" " * 5000, headers=auth).status_code == 413
        body = visit_body()
        assert client.post("/next-visit", json=body, headers=auth).status_code == 202
        assert client.post("/next-visit", json={**body, "duration": 31.0}, headers=auth).status_code == 409
        ctx = client.app.state.context  # type: ignore[attr-defined]
        scraped = {m.name: m for m in registry_for(celery_app, ctx).collect()}
    counted = read_counters(rdb, "intake_rejections")
    assert counted == {"reason=unauthorized": 1, "reason=invalid_visit": 1, "reason=body_too_large": 1,
                       "reason=conflicting_visit": 1}
    family = scraped["prompt_tasks_intake_rejections"]
    assert {s.labels["reason"]: s.value for s in family.samples if s.name.endswith("_total")} == {
        "unauthorized": 1, "invalid_visit": 1, "body_too_large": 1, "conflicting_visit": 1}
    rejected = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert len(rejected) == 4, rejected
    assert all("testclient" in line for line in rejected)  # the client's address
    assert any("field nimages" in line for line in rejected)
    assert any("field duration" in line for line in rejected)
    assert not any(secret_marker in r.getMessage() or TOKEN in r.getMessage() for r in caplog.records)
