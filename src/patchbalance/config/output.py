"""`output:`, where the build writes (SPEC §4): the table, its footprints, a PostgreSQL table."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator

from patchbalance.config.input import secret_as_text
from patchbalance.config.loading import StrictModel
from patchbalance.paths import footprint_format
from patchbalance.table import table_suffix


class PostgresTableConfig(StrictModel):
    """`output.postgres_table`: a new PostgreSQL table for the balanced table (SPEC §4).

    The connection keys are those of a PostgreSQL input; when none is given, the input's are
    used.
    """

    db_schema: str = Field(default="public", alias="schema")
    name: str = Field(min_length=1)
    if_exists: Literal["fail", "replace"] = "fail"
    dsn: str | None = Field(default=None, repr=False)
    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None
    password: str | None = Field(default=None, repr=False)

    @field_validator("password", "dsn", mode="before")
    @classmethod
    def _secret_as_text(cls, value: Any) -> Any:
        return secret_as_text(value)

    @property
    def has_connection(self) -> bool:
        """Return True when any connection key is given here."""
        keys = (self.dsn, self.host, self.port, self.database, self.user, self.password)
        return any(value not in (None, "") for value in keys)


class OutputConfig(StrictModel):
    """Where the build writes (SPEC §4)."""

    synonyms: ClassVar[dict[str, str]] = {"geojson_path": "footprints_path"}

    csv_path: str
    include_excluded: bool = True
    footprints_path: str | None = None
    postgres_table: PostgresTableConfig | None = None
    summary_path: str | None = None

    @field_validator("csv_path")
    @classmethod
    def _table_format(cls, value: str) -> str:
        return table_suffix(value)

    @field_validator("footprints_path")
    @classmethod
    def _known_footprint_format(cls, value: str | None) -> str | None:
        if value is not None:
            footprint_format(value)
        return value
