"""Results: the Parquet store with its DuckDB views, and every reported number computed from raw rows."""
