"""herd.data.synthetic: generated data with known answers for the CPU quickstart, tests and examples
(a text corpus, coloured-shape visual QA, preference pairs, SFT dialogs with known defects) and the quickstart's image contact sheet."""
