"""herd.data.synthetic: generated data with known answers for the CPU quickstart, tests and examples
(a text corpus, coloured-shape visual QA, preference pairs) and the quickstart's image contact sheet."""
