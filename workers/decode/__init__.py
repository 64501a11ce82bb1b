"""Decoding untrusted bytes into model inputs: images, webdataset tars, parquet cells."""
