"""The HTTP API: routers per resource, thin handlers, one error mapper."""
