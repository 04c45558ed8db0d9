"""Clients of the DualFocus service."""
