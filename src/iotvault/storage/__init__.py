"""Persistence: the repository interface (:mod:`.repository`), its SQL implementation for
SQLite and PostgreSQL (:mod:`.sql`), users, groups and API keys (:mod:`.accounts`), the table
definitions (:mod:`.schema`) and the Alembic migrations that create them (:mod:`.migrate`)."""
