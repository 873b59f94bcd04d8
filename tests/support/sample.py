"""Fixtures (to be filled)."""
