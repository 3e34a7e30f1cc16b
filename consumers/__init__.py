"""National side: the reconciler worker, merge rules and the store."""
