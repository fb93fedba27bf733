"""The science and the compute: plain functions and classes over in-memory data."""
