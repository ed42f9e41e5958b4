"""herd.data: data by job.

- `herd.data.records`: what every job shares (the skip counter, the ignore index, jsonl / parquet I/O);
- `herd.data.training`: datasets the training loop reads;
- `herd.data.curation`: offline preparation (dedup, filters, resampling, Ghost Attention data);
- `herd.data.synthetic`: generated data for the quickstart and tests.
"""
