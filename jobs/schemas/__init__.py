"""Request and response schemas of both API dialects."""
