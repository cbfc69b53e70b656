"""A click-capable LiteMedSAM: its prompt encoder and mask decoder trained for points on cached embeddings."""
