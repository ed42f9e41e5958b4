"""Tasks: what a modality or objective plugs into the one training loop (`herd.trainer.train`)."""
