"""herd.data.curation: offline data preparation (paper §3.1, §7.1): SSCD + FAISS image dedup, CLIP-score
filtering, n-gram resampling, URL / MinHash / line text dedup, heuristic filters, language identification,
Ghost Attention data, and SFT data curation (§4.2.3: rules, reward-model / judge scores, semantic dedup)."""
