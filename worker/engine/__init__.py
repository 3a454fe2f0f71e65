"""Model loading, batching, the decode loop and per-row sampling."""
