"""One parallel plan per model family (`herd.parallel.plan.ParallelPlan`): llama, multimodal, reward,
preference, conformer, speech. Imported by their full names; this package imports nothing."""
