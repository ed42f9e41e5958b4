"""herd.data.training: the datasets the training loop reads (packed text, token shards, dialogs,
preference pairs, image-text pairs), each counting the records it skips."""
