"""The DuckDB catalog, source adapters and the synthetic corpus.

Every SQL statement of the project lives in this package.
"""
