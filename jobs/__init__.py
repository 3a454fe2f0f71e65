"""The shared domain of mbatch: settings, schemas, persistence, storage, pricing."""
