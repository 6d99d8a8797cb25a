"""The M2M Enrolment Function: configuration, store, policy (service) and transport (server)."""
