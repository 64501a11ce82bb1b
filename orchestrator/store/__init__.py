"""Object storage: one interface over S3 and a local directory, and the scope a job may read."""
