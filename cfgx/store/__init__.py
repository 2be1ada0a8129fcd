"""Everything cfgx keeps on disk: run dirs, atomic writes, locks, safe loading, checkpoints."""
