"""The OpenAI-compatible HTTP service over the DualFocus engine (issue 3 fills it in)."""
