"""CLI commands: each module adds its subparser and runs by calling the library."""
