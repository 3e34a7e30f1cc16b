"""Operations: publish, replay and rebuild, dead letters, offsets (called by the CLI)."""

# Here, not in `purge`: the CLI shows it as a default without importing the store.
PURGE_CHUNK = 10_000  # keys per transaction of `source purge`
