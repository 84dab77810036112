"""BLIP-2 in plain PyTorch: frozen encoders, Q-Former, objectives, LLM bridge, CapFilt, training.

This package never imports Prefect or DuckDB; orchestration lives in `flows`, the catalog in
`data_catalog`.
"""
