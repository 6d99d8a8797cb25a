"""One exception hierarchy; each class maps to one oneM2M Response Status Code (TS-0004 §6.6).

Messages are written for people and never carry key material.
"""

from __future__ import annotations

from enum import IntEnum


class RSC(IntEnum):
    """oneM2M Response Status Codes used by this project (TS-0004 Table 6.6.3.x)."""

    OK = 2000
    CREATED = 2001
    DELETED = 2002
    UPDATED = 2004
    BAD_REQUEST = 4000
    RELEASE_VERSION_NOT_SUPPORTED = 4001
    NOT_FOUND = 4004
    OPERATION_NOT_ALLOWED = 4005
    REQUEST_TIMEOUT = 4008
    UNSUPPORTED_MEDIA_TYPE = 4015
    CONTENTS_UNACCEPTABLE = 4102
    ORIGINATOR_HAS_NO_PRIVILEGE = 4103  # called ACCESS_DENIED in the project's issues
    CONFLICT = 4105
    ORIGINATOR_NOT_AUTHENTICATED = 4106
    SECURITY_ASSOCIATION_REQUIRED = 4107
    APP_RULE_VALIDATION_FAILED = 4126
    SERVICE_SUBSCRIPTION_NOT_ESTABLISHED = 4128
    INTERNAL_SERVER_ERROR = 5000
    NOT_IMPLEMENTED = 5001
    TARGET_NOT_REACHABLE = 5103
    NOT_ACCEPTABLE = 5207

    @property
    def http_status(self) -> int:
        return _HTTP_STATUS[self]


# oneM2M HTTP binding (TS-0009 §6.4.x): RSC -> HTTP status code
_HTTP_STATUS = {
    RSC.OK: 200,
    RSC.CREATED: 201,
    RSC.DELETED: 200,
    RSC.UPDATED: 200,
    RSC.BAD_REQUEST: 400,
    RSC.RELEASE_VERSION_NOT_SUPPORTED: 400,
    RSC.NOT_FOUND: 404,
    RSC.OPERATION_NOT_ALLOWED: 405,
    RSC.REQUEST_TIMEOUT: 408,
    RSC.UNSUPPORTED_MEDIA_TYPE: 415,
    RSC.CONTENTS_UNACCEPTABLE: 400,
    RSC.ORIGINATOR_HAS_NO_PRIVILEGE: 403,
    RSC.CONFLICT: 409,
    RSC.ORIGINATOR_NOT_AUTHENTICATED: 403,
    RSC.SECURITY_ASSOCIATION_REQUIRED: 403,
    RSC.APP_RULE_VALIDATION_FAILED: 403,
    RSC.SERVICE_SUBSCRIPTION_NOT_ESTABLISHED: 403,
    RSC.INTERNAL_SERVER_ERROR: 500,
    RSC.NOT_IMPLEMENTED: 501,
    RSC.TARGET_NOT_REACHABLE: 404,  # TS-0009 maps 5103 to 404 Not Found
    RSC.NOT_ACCEPTABLE: 429,  # project decision: used only for the MEF's enrolment rate limit (with Retry-After)
}


class RspfError(Exception):
    """Base class. ``rsc`` is the oneM2M Response Status Code a request failing with it gets."""

    rsc: RSC = RSC.INTERNAL_SERVER_ERROR


class BadRequest(RspfError):
    rsc = RSC.BAD_REQUEST


class UnsupportedMediaType(RspfError):
    rsc = RSC.UNSUPPORTED_MEDIA_TYPE


class VersionNotSupported(RspfError):
    rsc = RSC.RELEASE_VERSION_NOT_SUPPORTED


class NotFound(RspfError):
    rsc = RSC.NOT_FOUND


class OperationNotAllowed(RspfError):
    rsc = RSC.OPERATION_NOT_ALLOWED


class RequestTimeout(RspfError):
    """A request did not arrive whole within the server's request deadline."""

    rsc = RSC.REQUEST_TIMEOUT


class AccessDenied(RspfError):
    rsc = RSC.ORIGINATOR_HAS_NO_PRIVILEGE


class NotAuthenticated(RspfError):
    rsc = RSC.ORIGINATOR_NOT_AUTHENTICATED


class SecurityAssociationRequired(RspfError):
    rsc = RSC.SECURITY_ASSOCIATION_REQUIRED


class Conflict(RspfError):
    rsc = RSC.CONFLICT


class ContentsUnacceptable(RspfError):
    rsc = RSC.CONTENTS_UNACCEPTABLE


class ProfileInvalid(ContentsUnacceptable):
    """A securityProfile does not satisfy resources/securityProfile.json."""


class EnrolmentRateLimited(RspfError):
    """An enrolee enrolled too often: the MEF answers 5207 NOT_ACCEPTABLE, HTTP 429 with ``Retry-After``
    (project decision, docs/mef-interface.md). ``retry_after`` is in whole seconds."""

    rsc = RSC.NOT_ACCEPTABLE

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(RspfError):
    """A configuration value is wrong or missing. The message names the key and the file."""


class TransportError(RspfError):
    """The peer could not be reached or did not answer: connection refused or reset, end of stream, a deadline
    passed, a malformed HTTP response, a TLS failure. The message names the peer and what happened."""

    rsc = RSC.TARGET_NOT_REACHABLE


class TlsError(TransportError):
    """A TLS handshake or record-layer failure (wrong key, unknown identity, peer gone)."""


class StoreError(RspfError):
    """The persistent store could not be read or written."""


class RemoteError(RspfError):
    """A peer answered a request with a oneM2M error; carries the peer's RSC and message."""

    def __init__(self, rsc: int, message: str) -> None:
        super().__init__(message)
        try:
            self.rsc = RSC(rsc)
        except ValueError:
            self.rsc = RSC.INTERNAL_SERVER_ERROR
        self.remote_rsc = rsc
