"""`input:`, the sources of records (SPEC §2.1): patch_records, records_path, rasters, PostgreSQL."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from patchbalance.config.loading import StrictModel


def secret_as_text(value: Any) -> Any:
    """Return a password or DSN as text; raise `ValueError` (without the value) otherwise."""
    # YAML reads `password: 12345` as a number; take it as text rather than echo it back in a
    # type error, and never show a secret's value in a message.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise ValueError("must be text (quote it in the YAML); its value is not shown")


class RasterPair(StrictModel):
    image_path: str
    mask_path: str


class InputConfig(StrictModel):
    """Exactly one source of records (SPEC §2.1)."""

    # 1. inline records
    patch_records: list[dict[str, Any]] | None = None
    # 2. a CSV or Parquet file of records
    records_path: str | None = None
    # 3. a regular grid over rasters
    rasters: list[RasterPair] | None = None
    image_glob: str | None = None
    mask_glob: str | None = None
    patch_size: int | None = Field(default=None, gt=0)
    stride: int | None = Field(default=None, gt=0)
    # Window placement over rasters (SPEC §2.1): the grid, or the grid plus class-centred windows.
    placement: Literal["grid", "class_centred"] = "grid"
    rare_below: float = Field(default=0.05, ge=0, le=1)
    rare_classes: list[int] | None = None
    class_windows_per_raster: int = Field(default=16, ge=1)
    # None: 1 % of the window; below 1: a fraction of the window; else a pixel count.
    class_min_pixels: float | None = Field(default=None, gt=0)
    max_overlap: float = Field(default=0.5, ge=0, le=1)
    # 4. PostgreSQL
    host: str | None = None
    port: int | None = None
    database: str | None = None
    user: str | None = None
    password: str | None = Field(default=None, repr=False)
    table: str | None = None
    where_clause: str | None = None
    dsn: str | None = Field(default=None, repr=False)
    db_schema: str | None = Field(default=None, alias="schema")
    image_path_column: str = "file_path"
    mask_path_column: str = "mask_path"
    row_off_column: str = "row_off"
    col_off_column: str = "col_off"
    patch_size_column: str = "patch_size"
    class_dist_column: str = "class_dist"
    uniqueness_score_column: str = "uniqueness_score"
    embedding_column: str | None = None
    use_table_stats: bool = True
    fetch_size: int = Field(default=10_000, gt=0)

    @field_validator("password", "dsn", mode="before")
    @classmethod
    def _secret_as_text(cls, value: Any) -> Any:
        return secret_as_text(value)

    def _source_kinds(self) -> list[str]:
        kinds = []
        if self.patch_records is not None:
            kinds.append("patch_records")
        if self.records_path is not None:
            kinds.append("records_path")
        if self.rasters is not None or self.image_glob is not None or self.mask_glob is not None:
            kinds.append("rasters")
        if self.table is not None or self.dsn is not None or self.host is not None:
            kinds.append("postgres")
        return kinds

    @property
    def source_kind(self) -> str:
        """Return which source this block configures: patch_records, records_path, rasters, postgres."""
        kinds = self._source_kinds()
        return kinds[0] if len(kinds) == 1 else ""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> InputConfig:
        kinds = self._source_kinds()
        if not kinds:
            raise ValueError(
                "no source given; set one of patch_records, records_path, rasters (or "
                "image_glob + mask_glob) or a PostgreSQL table"
            )
        if len(kinds) > 1:
            names = {"rasters": "rasters/image_glob", "postgres": "PostgreSQL (host/dsn/table)"}
            described = " and ".join(names.get(kind, kind) for kind in kinds)
            raise ValueError(f"give exactly one source, not {described}")
        if kinds[0] == "rasters":
            if self.patch_size is None:
                raise ValueError("the rasters source needs patch_size (pixels)")
            if (self.image_glob is None) != (self.mask_glob is None):
                raise ValueError("image_glob and mask_glob go together; give both")
            if self.rasters is not None and self.image_glob is not None:
                raise ValueError("give either rasters or image_glob + mask_glob, not both")
        if self.placement != "grid" and kinds[0] != "rasters":
            raise ValueError(
                f"placement: {self.placement} needs the rasters source (rasters or image_glob + "
                "mask_glob); other sources give their windows themselves"
            )
        if kinds[0] == "postgres" and self.table is None:
            raise ValueError("the PostgreSQL source needs table")
        return self
