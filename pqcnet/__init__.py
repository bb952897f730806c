"""pqcnet package."""
