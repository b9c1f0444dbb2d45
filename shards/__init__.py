"""The shard cache: its schema, the writer and manifest, and the train/eval readers."""
