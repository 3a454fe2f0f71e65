"""mbatch: queue-based batch inference for Mistral-7B-Instruct models."""
