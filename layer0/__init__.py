"""layer0 package."""
