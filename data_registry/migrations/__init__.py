"""Alembic migrations of the archive catalogue (run on open by :func:`data_registry.catalog.upgrade`)."""
