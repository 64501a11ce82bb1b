"""Jobs over an embed job's vectors: semantic dedup and nearest neighbours."""
