"""herd.speech: see ../shared/DESIGN.md; filled in by later issues."""
