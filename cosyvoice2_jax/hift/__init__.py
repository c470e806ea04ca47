"""hift."""
