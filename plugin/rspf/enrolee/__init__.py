"""The Enrolee client: MEF handshake, securityProfile provisioning, Enrolment Exchange, encrypted storage."""

from .client import Enrolee, EnroleeConfig, Enrolment

__all__ = ["Enrolee", "EnroleeConfig", "Enrolment"]
