"""The embedded local stack: a private Redis-compatible server, worker processes, the demo and GPU pools."""
