"""herd.data: datasets, loaders and data preparation (dedup, filters)."""
