"""Talking to the intake: splitting event files, sending events, aborting visits.

Used by ``prompt-tasks next-visit`` and ``prompt-tasks abort``. An event file holds a JSON
object, a JSON array of objects, or JSON lines; :func:`split_events` turns it into one body per
event without judging them (the intake does that, and says why).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import httpx

from prompt_tasks.settings import Settings

__all__ = ["IntakeClient", "Outcome", "default_url", "split_events"]


def default_url(settings: Settings) -> str:
    """Base URL of the intake of ``settings``."""
    return f"http://{settings.host}:{settings.intake_port}"


def split_events(text: str) -> list[str]:
    """One body per event of ``text``: a JSON object, a JSON array, or JSON lines.

    A line of JSON lines that is not JSON is still returned (the intake rejects it with the
    reason); blank lines are skipped.
    """
    stripped = text.strip()
    if not stripped:
        return []
    try:
        whole = json.loads(stripped)
    except (ValueError, RecursionError):
        return [line.strip() for line in stripped.splitlines() if line.strip()]
    if isinstance(whole, list):
        return [json.dumps(item) for item in whole]
    return [stripped]


@dataclass(frozen=True)
class Outcome:
    """What the intake answered to one event."""

    status: int
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        """True for a new or duplicate visit."""
        return 200 <= self.status < 300

    @property
    def duplicate(self) -> bool:
        """True when the visit had already been announced."""
        return bool(self.body.get("duplicate"))

    def describe(self) -> str:
        """One line for people."""
        if self.accepted:
            detectors = self.body.get("detectors") or []
            state = "duplicate" if self.duplicate else "new"
            return f"{self.body.get('key', '?')} {state} ({len(detectors)} detectors)"
        errors = self.body.get("errors") or []
        reasons = "; ".join(f"{e.get('field')}: {e.get('reason')}" for e in errors) or self.body.get(
            "detail", ""
        )
        return f"rejected ({self.status} {self.body.get('code', '')}): {reasons}"


class IntakeClient:
    """HTTP client of the intake at ``base_url``, with the bearer ``token`` if any."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings, base_url: str | None = None) -> IntakeClient:
        """A client of the intake of ``settings``, with its token."""
        token = settings.intake_token.get_secret_value() if settings.intake_token else None
        return cls(base_url or default_url(settings), token)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def _outcome(self, response: httpx.Response) -> Outcome:
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:200]}
        return Outcome(response.status_code, body if isinstance(body, dict) else {"detail": str(body)})

    def next_visit(self, body: str | bytes) -> Outcome:
        """POST one next_visit body."""
        content = body.encode() if isinstance(body, str) else body
        response = self._http.post(
            "/next-visit", content=content, headers={"Content-Type": "application/json"}
        )
        return self._outcome(response)

    def visit(self, instrument: str, group: str) -> Outcome:
        """GET a visit's ledger record."""
        return self._outcome(self._http.get(f"/visits/{_path(instrument)}/{_path(group)}"))

    def abort(self, instrument: str, group: str, reason: str = "aborted") -> Outcome:
        """Abort a visit."""
        return self._outcome(
            self._http.post(f"/visits/{_path(instrument)}/{_path(group)}/abort", params={"reason": reason})
        )

    def health(self) -> Outcome:
        """GET /healthz."""
        return self._outcome(self._http.get("/healthz"))


def _path(part: str) -> str:
    return quote(part, safe=":.-_")
