"""The audit log: one JSON object per line, appended, never rewritten (docs/observability.md).

Each line says who did what to what, and how it ended::

    {"time": "2026-12-02T14:54:26.123Z", "actor": "operator:alice", "action": "enrolee.revoke",
     "subject": "dev1@mef.example.com", "result": "ok", "cause": "", "details": {"keys": 2}}

Key material cannot be written: every field is typed (``str``; ``details`` values ``str``, ``int`` or
``bool``) and anything else -- a :class:`rspf.secret.Secret`, ``bytes`` -- raises TypeError before a byte is
written. The file is created 0600 (an existing one readable by others is refused), opened with O_APPEND so
several processes (``rspf mef serve`` and the admin commands) can share it, and each line goes out in one
``write`` (flushed per line). Refusals are rate-limited like the operator's log
(:class:`rspf.ratelimit.RefusalLog`): past a burst per interval they are only counted, and one summary line
per interval says how many were left out, why and from where.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import logging
import os
import pwd
import threading
from collections.abc import Mapping
from pathlib import Path

from .errors import ConfigError
from .fileutil import check_private
from .ratelimit import Clock, RefusalLog

log = logging.getLogger(__name__)

#: Refusals written in full per interval; the rest are counted in one summary line per interval
REFUSAL_BURST = 50
REFUSAL_INTERVAL = 60.0
#: Longest text kept in one field (values an attacker chose are cut here)
MAX_FIELD = 512


class Result(enum.StrEnum):
    OK = "ok"
    REFUSED = "refused"  # a peer's or operator's request was not allowed (cause says why)
    FAILED = "failed"    # it was allowed but could not be done (cause says why)


class Action(enum.StrEnum):
    """Every action the audit log records (docs/observability.md lists them with their subjects)."""

    # MEF administration (actor operator:<OS user>)
    ENROLEE_ADD = "enrolee.add"
    ENROLEE_IMPORT = "enrolee.import"
    ENROLEE_UPDATE = "enrolee.update"
    ENROLEE_SUSPEND = "enrolee.suspend"
    ENROLEE_RESUME = "enrolee.resume"
    ENROLEE_REVOKE = "enrolee.revoke"
    ENROLEE_DELETE = "enrolee.delete"
    ENROLEE_ROTATE_KPM = "enrolee.rotate-kpm"
    KEY_REVOKE = "key.revoke"
    CERTIFICATE_REVOKE = "certificate.revoke"
    TARGET_ADD = "target.add"
    TARGET_REVOKE = "target.revoke"
    DATABASE_MIGRATE = "database.migrate"      # the SQLite database copied into PostgreSQL
    # MEF service
    AUTHENTICATE = "authenticate"              # a TLS-PSK identity was refused
    CONNECTION = "connection"                  # the transport refused a connection (handshake, limits, deadlines)
    ENROLMENT_PROFILE = "enrolment.profile"    # a securityProfile was provisioned
    ENROLMENT_KEY = "enrolment.key-stored"     # an Enrolment Key was stored under its KeID
    ENROLMENT = "enrolment"                    # an enrolment request was refused
    FETCH = "fetch-credentials"
    CERTIFICATE_ISSUED = "certificate.issued"  # the EST server issued a certificate
    EST = "est"                                # an EST request was refused
    REVOCATION_FEED = "revocation-feed"
    REQUEST = "request"                        # any other request that was refused
    REFUSALS_SUMMARY = "refusals.summary"      # refusals past the burst of an interval, counted
    # CSE plugin
    REGISTRATION = "registration"              # an AE registration checked against the rules
    CREDENTIAL_RECORDED = "credential.recorded"
    REVOCATION_APPLIED = "revocation.applied"


def operator() -> str:
    """The actor of an admin command: ``operator:<OS user>`` -- the user of the process's real uid (not an
    environment variable it could set), and under sudo also who ran sudo (``SUDO_USER``, as sudo sets it):
    ``operator:mef (sudo by alice)``."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # no user name for this uid
        user = f"uid {os.getuid()}"
    sudo = os.environ.get("SUDO_USER", "")
    if sudo and sudo != user:
        return f"operator:{user} (sudo by {sudo[:64]})"
    return f"operator:{user}"


def _text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"audit field {name} must be str, not {type(value).__name__} (key material is never "
                        "written to the audit log)")
    return value[:MAX_FIELD]


def _dumps(entry: dict[str, object]) -> str:
    return json.dumps(entry, ensure_ascii=True, separators=(",", ":"))


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    """Append-only JSON-lines audit log. Thread-safe; ``AuditLog(None)`` records nothing (audit off)."""

    def __init__(self, path: Path | None, *, what: str = "audit log", burst: int = REFUSAL_BURST,
                 interval: float = REFUSAL_INTERVAL, clock: Clock | None = None) -> None:
        self.path = path
        self.write_errors = 0  #: lines that could not be written (the health endpoint reports them)
        self._lock = threading.Lock()
        self._fd: int | None = None
        if path is not None:
            self._fd = self._open(Path(path), what)
        kwargs = {"clock": clock} if clock is not None else {}
        self._refusals = RefusalLog(self._refusal_line, burst=burst, interval=interval,
                                    summary=self._summary_line, **kwargs)

    @staticmethod
    def _open(path: Path, what: str) -> int:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open the {what} {path} for appending: {exc.strerror or exc}") from None
        try:
            if not os.path.isfile(path):
                raise ConfigError(f"the {what} {path} is not a regular file")
            check_private(path, what)
        except BaseException:
            os.close(fd)
            raise
        return fd

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def record(self, action: Action, *, actor: str, subject: str, result: Result = Result.OK, cause: str = "",
               details: Mapping[str, str | int | bool] | None = None) -> None:
        """Write one line now (also a refusal: use :meth:`refused` for those a peer can repeat at will)."""
        entry = self._check(action, actor, subject, result, cause, details)  # also when off: a mistake shows
        if self._fd is not None:
            self._write(_dumps(entry))

    def refused(self, action: Action, *, actor: str, subject: str, cause: str, source: str | None = None,
                details: Mapping[str, str | int | bool] | None = None) -> None:
        """A refusal, rate-limited: the first ``burst`` of an interval in full, the others counted by cause
        (and ``source``, a peer address) in one summary line."""
        entry = self._check(action, actor, subject, Result.REFUSED, cause, details)
        if self._fd is not None:
            self._refusals.refused(_dumps(entry), reason=f"{action.value}: {cause[:80]}", source=source)

    def roll(self) -> None:
        """Write the summary of a refusal interval that is over (call from a timer)."""
        if self._fd is not None:
            self._refusals.roll()

    def close(self) -> None:
        if self._fd is None:
            return
        self._refusals.flush()  # the count of the interval in progress
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- internals ------------------------------------------------------------------------------
    @staticmethod
    def _check(action: Action, actor: str, subject: str, result: Result, cause: str,
               details: Mapping[str, str | int | bool] | None) -> dict[str, object]:
        if not isinstance(action, Action):
            raise TypeError("audit action must be an rspf.audit.Action")
        if not isinstance(result, Result):
            raise TypeError("audit result must be an rspf.audit.Result")
        entry: dict[str, object] = {"time": _now(), "actor": _text("actor", actor), "action": action.value,
                                    "subject": _text("subject", subject), "result": result.value,
                                    "cause": _text("cause", cause)}
        if details:
            checked: dict[str, object] = {}
            for key, value in details.items():
                if isinstance(value, bool | int):
                    checked[_text("details key", key)] = value if isinstance(value, bool) else int(value)
                else:
                    checked[_text("details key", key)] = _text(f"details[{key!r}]", value)
            entry["details"] = checked
        return entry

    def _write(self, line: str) -> None:
        data = (line + "\n").encode("ascii")
        with self._lock:
            fd = self._fd
            if fd is None:
                return
            try:
                os.write(fd, data)  # one write per line: O_APPEND keeps lines whole, also across processes
            except OSError as exc:
                self.write_errors += 1
                log.error("cannot write to the audit log %s: %s", self.path, exc.strerror or exc)

    def _refusal_line(self, level: int, text: str) -> None:
        if level >= logging.WARNING:  # within the burst: the whole line; past it only counted
            self._write(text)

    def _summary_line(self, text: str) -> None:
        self._write(_dumps(self._check(Action.REFUSALS_SUMMARY, "audit", "refusals", Result.REFUSED, text, None)))
