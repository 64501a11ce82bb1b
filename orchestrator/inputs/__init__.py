"""What a job reads and how it is cut into units: listing, manifests, tar samples, parquet and `datasets` folders, labels, vector parts."""
