"""Client libraries for callers of the suite (an LLM gateway's side of the request path)."""
