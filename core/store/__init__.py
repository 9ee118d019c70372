"""The records: SQLAlchemy models, their migrations and sessions, atomic file writes, the consistency check.
Imports only core.config and core.errors; every other package builds on it."""
