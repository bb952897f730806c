"""sentry package."""
