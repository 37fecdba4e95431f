"""Settings models at the command line: `settings.cli` turns a pydantic settings model into flags."""
