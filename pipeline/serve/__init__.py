"""Using a trained model: export it (export), embed images with the exported model (runtime),
build a searchable gallery of embeddings (gallery) and search it (search)."""
