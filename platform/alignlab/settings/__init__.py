"""Settings models at the command line: `settings.cli` derives argparse flags from a pydantic model."""
