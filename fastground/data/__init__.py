"""Data pipeline: conversations, datasets, media loaders, batching, sampling."""
