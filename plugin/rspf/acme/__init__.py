"""The SEC CSF plugin for the ACME oneM2M CSE and its host integration."""
