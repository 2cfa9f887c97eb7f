"""flowpress: CLI, recipe schema, stage chaining, run directory and manifest."""
