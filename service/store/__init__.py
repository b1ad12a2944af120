"""Persistence: engine, ORM tables and migrations. SQL lives here and in repositories."""
