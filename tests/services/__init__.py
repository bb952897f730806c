"""Smoke tests of the real services started by ``scripts/services``."""
