"""herd.data.curation: offline data preparation (paper §3.1, §7.1): SSCD + FAISS image dedup, CLIP-score
filtering, n-gram resampling, URL / MinHash / line text dedup, heuristic filters, Ghost Attention data."""
