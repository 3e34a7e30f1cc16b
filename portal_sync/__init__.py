"""portal-sync: CLI, settings, local broker and the demo."""
