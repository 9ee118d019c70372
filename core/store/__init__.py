"""The records: SQLAlchemy models, their migrations and sessions, atomic file writes, the consistency check.
Imports only core.config and core.errors; every other package builds on it."""

# The tables of reviews and label checks live in modules of their own beside db.py; importing them
# with the package puts them in Base.metadata, which the migrations and their checks compare with,
# whichever of the package's modules is imported first.
from core.store import label_checks, review_tables  # noqa: E402, F401
