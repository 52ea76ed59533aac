"""The model side: cards, files on disk, checkpoint readers, tokenizers and chat templates, shards."""
