"""Alembic revisions of the archive catalogue."""
