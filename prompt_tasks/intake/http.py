"""The intake's HTTP API (FastAPI): next_visit in, visit ledgers and aborts out.

=========================================== ====================================================
``POST /next-visit``                        announce a visit (summit JSON form): 202 new, 200
                                            duplicate, 409 same visit with another body, 413
                                            body too large, 422 field errors
``GET /visits/{instrument}/{group}``        the visit's ledger record (404 if unknown)
``POST /visits/{instrument}/{group}/abort`` end the visit's waits and note the abort in the ledger
``GET /healthz``                            broker and Redis reachability (always 200)
``GET /openapi.json``                       the OpenAPI spec
=========================================== ====================================================

When ``intake_token`` is set, every route but ``/healthz`` needs ``Authorization: Bearer
<token>``. The body of ``POST /next-visit`` is read here with a size limit and parsed by
:func:`~prompt_tasks.model.visit.parse_next_visit`, so an oversized body is refused before any
parsing, and every rejection has the same shape (:func:`~prompt_tasks.intake.errors.error_body`).
Every rejection (4xx) is logged, one line with its code, the fields at fault and the client's
address, and counted by code in the metrics counter ``intake_rejections`` (``/metrics``).
Neither the token nor bodies are logged.
"""

from __future__ import annotations

import hmac
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from prompt_tasks.context import Context
from prompt_tasks.errors import InvalidVisit, PromptTasksError, RetryLater
from prompt_tasks.flow.router import announce
from prompt_tasks.intake.errors import (
    BodyTooLarge,
    ConflictingVisit,
    Unauthorized,
    UnknownVisit,
    error_body,
    http_error,
)
from prompt_tasks.logs import bound
from prompt_tasks.model.visit import NextVisit, parse_next_visit, visit_differences
from prompt_tasks.settings import Settings
from prompt_tasks.store import metrics
from prompt_tasks.store.arrivals import abort_visit
from prompt_tasks.store.ledger import read_visit, set_fields, visit_key

if TYPE_CHECKING:
    from celery import Celery

__all__ = ["REJECTIONS", "Abort", "Accepted", "ErrorBody", "Health", "create_api", "submit"]

log = logging.getLogger(__name__)

_INSTRUMENT = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
#: Metrics counter of rejected requests, by ``reason`` (the error code).
REJECTIONS = "intake_rejections"


class Accepted(BaseModel):
    """Answer to an accepted (or duplicate) next_visit."""

    key: str = Field(description="The visit key, instrument/groupId.")
    duplicate: bool = Field(description="True when this visit had already been announced.")
    detectors: list[int] = Field(description="Detectors the visit is processed on.")


class FieldError(BaseModel):
    """One invalid field and why."""

    field: str
    reason: str


class ErrorBody(BaseModel):
    """Every error answer: a stable code, a message and, for bad input, the fields."""

    code: str
    detail: str
    errors: list[FieldError] = []


class Abort(BaseModel):
    """Answer to an abort."""

    key: str
    aborted: bool = True
    known: bool = Field(description="Whether the ledger holds the visit.")
    woken: int = Field(description="Waiters woken.")


class Health(BaseModel):
    """Reachability of what the intake needs."""

    ok: bool
    broker: bool
    redis: bool


_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (401, "missing or wrong bearer token"),
        (404, "unknown visit"),
        (409, "the visit was announced with another body: the fields that differ"),
        (413, "body over the size limit"),
        (422, "invalid input, with the fields at fault"),
        (503, "broker or Redis unreachable"),
    )
}


def _unreachable_errors() -> tuple[type[Exception], ...]:
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (OperationalError, RedisConnectionError, RedisTimeoutError, ConnectionError)


#: Errors that mean the broker or Redis cannot be reached: 503, not 500.
_UNREACHABLE = _unreachable_errors()


def submit(celery_app: Celery, ctx: Context, visit: NextVisit) -> Accepted:
    """Announce ``visit`` (its one ``detector`` only, in the fan-out form) and say how it went.

    Connection failures towards the broker or Redis become :class:`RetryLater`; a repeat
    whose body announces another visit than the first raises :class:`ConflictingVisit`.
    """

    detectors = None if visit.detector is None else [visit.detector]
    try:
        result = announce(celery_app, ctx, visit.without_detector(), detectors=detectors)
        if result.duplicate:
            _check_same_visit(ctx, visit)
    except _UNREACHABLE as exc:
        raise RetryLater(f"cannot announce {visit.key}: {type(exc).__name__}") from exc
    return Accepted(key=result.key, duplicate=result.duplicate, detectors=list(result.detectors))


def _check_same_visit(ctx: Context, visit: NextVisit) -> None:
    """Raise :class:`ConflictingVisit` when the ledger's visit differs from ``visit``."""
    stored = ctx.redis.hget(visit_key(visit.instrument, visit.groupId), "visit")
    if not stored:
        return
    differ = visit_differences(parse_next_visit(stored), visit)
    if differ:
        errors = [{"field": name, "reason": "differs from the visit announced first"} for name in differ]
        raise ConflictingVisit(f"{visit.key} was announced with other {', '.join(differ)}", errors)


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with :class:`BodyTooLarge` as soon as it passes ``limit``."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body: larger than {limit} bytes")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"body: larger than {limit} bytes")
    return bytes(body)


def _check_ids(instrument: str, group: str) -> None:
    errors = []
    if not _INSTRUMENT.match(instrument):
        errors.append({"field": "instrument", "reason": "not an instrument name"})
    if not group or len(group) > 128 or any(ch.isspace() or not ch.isprintable() for ch in group):
        errors.append({"field": "group", "reason": "not a group id"})
    if errors:
        raise InvalidVisit("; ".join(f"{e['field']}: {e['reason']}" for e in errors), errors)


def _token_check(settings: Settings) -> Callable[..., None]:
    """A dependency demanding the bearer token, when one is configured."""
    scheme = HTTPBearer(auto_error=False, description="The intake token (intake_token).")
    expected = settings.intake_token.get_secret_value().encode() if settings.intake_token else b""

    def require_token(
        credentials: HTTPAuthorizationCredentials | None = Depends(scheme),  # noqa: B008 - FastAPI idiom
    ) -> None:
        if not expected:
            return
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, expected):
            raise Unauthorized("a valid bearer token is required")

    return require_token


def _error_response(exc: BaseException) -> JSONResponse:
    status, _ = http_error(exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    return JSONResponse(error_body(exc), status_code=status, headers=headers)


def _count_rejection(ctx: Context, code: str) -> None:
    try:
        metrics.count(ctx.redis, REJECTIONS, reason=code)
    except Exception as exc:  # noqa: BLE001 - a rejection is answered even when Redis is not there
        log.warning("rejection not counted (%s)", type(exc).__name__)


async def _rejected(request: Request, exc: PromptTasksError) -> None:
    """Log one line for a rejected request (code, fields, client; never the body) and count it."""
    _, code = http_error(exc)
    fields = [str(e.get("field", "")) for e in getattr(exc, "errors", [])][:8]
    client = request.client.host if request.client is not None else "unknown"
    where = f" field {', '.join(f[:64] for f in fields)}" if fields else ""
    log.warning("rejected %s %s: %s%s from %s", request.method, request.url.path[:128], code, where, client)
    await run_in_threadpool(_count_rejection, request.app.state.context, code)


def _add_error_handlers(api: FastAPI) -> None:
    @api.exception_handler(PromptTasksError)
    async def _known(request: Request, exc: PromptTasksError) -> JSONResponse:
        status, code = http_error(exc)
        if status >= 500:
            log.error("intake error %s: %s", code, exc)
        else:
            await _rejected(request, exc)
        return _error_response(exc)

    @api.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"field": ".".join(str(p) for p in e.get("loc", ()) if p not in ("body", "path", "query"))
             or "body", "reason": str(e.get("msg", "invalid"))}
            for e in exc.errors()
        ]
        invalid = InvalidVisit("; ".join(f"{e['field']}: {e['reason']}" for e in errors), errors)
        await _rejected(request, invalid)
        return _error_response(invalid)

    async def _unreachable(_: Request, exc: Exception) -> JSONResponse:
        log.warning("intake: broker or Redis unreachable (%s)", type(exc).__name__)
        return _error_response(RetryLater(f"broker or Redis unreachable ({type(exc).__name__})"))

    for unreachable in _UNREACHABLE:
        api.add_exception_handler(unreachable, _unreachable)  # type: ignore[arg-type]

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("intake: unexpected %s", type(exc).__name__)
        return _error_response(exc)


def _openapi(api: FastAPI) -> dict[str, Any]:
    """The spec, with the next_visit model (and its enums) among the components."""
    if api.openapi_schema is None:
        spec = get_openapi(title=api.title, version=api.version, description=api.description,
                           routes=api.routes)
        model = NextVisit.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas = spec.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(model.pop("$defs", {}))
        schemas["NextVisit"] = model
        api.openapi_schema = spec
    return api.openapi_schema


def _reachable(check: Callable[[], object]) -> bool:
    try:
        check()
    except Exception:  # noqa: BLE001 - any failure means unreachable
        return False
    return True


def create_api(settings: Settings, celery_app: Celery) -> FastAPI:
    """The intake's FastAPI application for ``settings``, announcing through ``celery_app``.

    The app owns a :class:`~prompt_tasks.context.Context` (``app.state.context``), closed when
    the app shuts down.
    """
    ctx = Context(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        ctx.close()

    api = FastAPI(
        title="prompt-tasks intake",
        version="1",
        description="Announce visits (next_visit) and follow them.",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    api.state.context = ctx
    api.state.settings = settings
    _add_error_handlers(api)
    auth = [Depends(_token_check(settings))]

    @api.post(
        "/next-visit",
        status_code=202,
        response_model=Accepted,
        dependencies=auth,
        responses={200: {"model": Accepted, "description": "duplicate: already announced"}, **_ERRORS},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/NextVisit"}}},
            }
        },
        summary="Announce a visit",
    )
    async def next_visit(request: Request, response: Response) -> Accepted:
        """Announce one visit; the same (instrument, groupId) twice starts it once."""
        body = await _read_body(request, settings.intake_max_body)
        visit = parse_next_visit(body)
        with bound(instrument=visit.instrument, group=visit.groupId):
            accepted = await run_in_threadpool(submit, celery_app, ctx, visit)
            log.info("next_visit %s %s", accepted.key, "duplicate" if accepted.duplicate else "accepted")
        if accepted.duplicate:
            response.status_code = 200
        return accepted

    @api.get("/visits/{instrument}/{group}", dependencies=auth, responses=_ERRORS,
             summary="A visit's ledger record")
    def visit_record(instrument: str, group: str) -> dict[str, Any]:
        """The ledger record of a visit: per detector, the time of every stage and its status."""

        _check_ids(instrument, group)
        record = read_visit(ctx.redis, instrument, group)
        if record is None:
            raise UnknownVisit(f"no visit {instrument}/{group} in the ledger")
        out = record.to_dict()
        aborted, reason = ctx.redis.hmget(visit_key(instrument, group), ["aborted", "abort_reason"])
        if aborted:
            out["aborted"] = float(aborted)
            out["abort_reason"] = reason or ""
        return out

    @api.post("/visits/{instrument}/{group}/abort", status_code=202, response_model=Abort,
              dependencies=auth, responses=_ERRORS, summary="Abort a visit")
    def abort(instrument: str, group: str, reason: str = "aborted") -> Abort:
        """End every wait of the visit now and note the abort in its ledger record."""

        _check_ids(instrument, group)
        reason = reason[:200]
        woken = abort_visit(ctx.redis, instrument, group, reason=reason)
        known = bool(ctx.redis.exists(visit_key(instrument, group)))
        if known:
            set_fields(ctx.redis, instrument, group, {"aborted": repr(time.time()), "abort_reason": reason},
                       settings.ledger_ttl_s)
        with bound(instrument=instrument, group=group):
            log.warning("visit %s/%s aborted (%s), %d waiters woken", instrument, group, reason, woken)
        return Abort(key=f"{instrument}/{group}", known=known, woken=woken)

    @api.get("/healthz", response_model=Health, summary="Liveness and reachability")
    def healthz() -> Health:
        """Always 200 while the process lives; says whether the broker and Redis answer."""

        def broker() -> None:
            with celery_app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, timeout=2)

        redis_ok = _reachable(ctx.redis.ping)
        broker_ok = _reachable(broker)
        return Health(ok=redis_ok and broker_ok, broker=broker_ok, redis=redis_ok)

    @api.get("/openapi.json", include_in_schema=False, dependencies=auth)
    def openapi() -> dict[str, Any]:
        return _openapi(api)

    api.openapi = lambda: _openapi(api)  # type: ignore[method-assign]
    return api
