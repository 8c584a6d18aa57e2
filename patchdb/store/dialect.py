"""INSERT ... ON CONFLICT for the store's database, so concurrent writers never collide."""

from typing import Any

from sqlalchemy.orm import Session

from patchdb.errors import StoreError


def dialect_insert(session: Session, table: Any) -> Any:
    """INSERT with ON CONFLICT support for the store's database (SQLite or PostgreSQL)."""
    name = session.get_bind().dialect.name
    if name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    elif name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    else:
        raise StoreError(f"patchdb writes only SQLite or PostgreSQL stores, not {name}")
    return insert(table)
