"""Local services the pipeline needs on the default profile (a private Redis server)."""
