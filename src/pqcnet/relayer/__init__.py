"""relayer package."""
