"""Per-project state the backend remembers (last prompt and thresholds, /setup's extra_params, labeling
config and credentials), in the shared database so that every worker process and replica agrees."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from ..ls_api import Credentials
from .db import Database, JsonObject, credentials_from_row, project_state_table, serialise


@dataclass(frozen=True)
class StoredProjectState:
    """What the backend remembers about a project, shared by every worker."""

    project: str
    remembered: JsonObject | None = None
    extra: JsonObject | None = None
    label_config: str | None = None
    credentials: Credentials | None = field(default=None, repr=False)
    updated: float = 0.0


class ProjectStates:
    """Read and update ``StoredProjectState`` rows; safe for threads and processes."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def get(self, project: str) -> StoredProjectState | None:
        with self.db.read() as conn:
            row = conn.execute(sa.select(project_state_table).where(
                project_state_table.c.project == str(project))).mappings().first()
        return None if row is None else _project_state(row)

    def update(self, project: str, **changes: Any) -> StoredProjectState:
        """Set some of ``remembered``, ``extra``, ``label_config``, ``credentials`` for a project (the
        others keep their value); returns the whole state."""
        allowed = {"remembered", "extra", "label_config", "credentials"}
        unknown = set(changes) - allowed
        if unknown:
            raise TypeError(f"unknown project state fields {sorted(unknown)}; allowed: {sorted(allowed)}")
        values: JsonObject = {k: v for k, v in changes.items() if k != "credentials"}
        if "credentials" in changes:
            credentials: Credentials | None = changes["credentials"]
            values.update(ls_url=credentials.url if credentials else None,
                          api_key=credentials.api_key if credentials else None)
        now = self.db.clock()
        p = project_state_table
        with self.db.write() as conn:
            serialise(conn, f"project|{project}")  # two replicas' first /setup must not both insert
            exists = conn.execute(sa.select(p.c.project).where(p.c.project == str(project))).first()
            if exists:
                conn.execute(p.update().where(p.c.project == str(project)).values(updated=now, **values))
            else:
                conn.execute(p.insert().values(project=str(project), updated=now, **values))
            row = conn.execute(sa.select(p).where(p.c.project == str(project))).mappings().one()
        return _project_state(row)

    def forget(self, project: str) -> None:
        with self.db.write() as conn:
            conn.execute(project_state_table.delete().where(project_state_table.c.project == str(project)))


def _project_state(row: RowMapping) -> StoredProjectState:
    return StoredProjectState(project=str(row["project"]), remembered=row["remembered"], extra=row["extra"],
                              label_config=row["label_config"],
                              credentials=credentials_from_row(row["ls_url"], row["api_key"], "setup"),
                              updated=float(row["updated"]))
