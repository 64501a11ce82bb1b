"""The `vitbatch` command line."""
