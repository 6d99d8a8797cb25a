"""The Enrolee client: MEF handshake, securityProfile provisioning, Enrolment Exchange, encrypted storage."""

from .client import Enrolee, EnroleeConfig, Enrolment
from .renewal import Backoff, Renewer

__all__ = ["Backoff", "Enrolee", "EnroleeConfig", "Enrolment", "Renewer"]
