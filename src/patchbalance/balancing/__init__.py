"""`build-balanced-dataset`: the pipeline and its stages (SPEC §3, §4).

records (`patchbalance.sources`) → mask statistics (`raster_reading`, `window_counts`, `stats`) →
exclusion → composition → embeddings (`patchbalance.embeddings`) → uniqueness → weights
(`weights`, `class_target`) → outputs (`result_table`, `outputs`, `postgres_table`, `summary`).
`pipeline.run_build` runs them in order.
"""
