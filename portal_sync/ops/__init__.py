"""Operations: publish, replay and rebuild, dead letters, offsets (called by the CLI)."""
