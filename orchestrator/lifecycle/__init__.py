"""A job's life in Redis: the ledger of units, leases and fencing, states, reconcile, finalize and the commit rules."""
