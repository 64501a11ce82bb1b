"""What a job publishes and how it is read back: result readers, the Delta commit, the job page and the output prefix's ownership."""
