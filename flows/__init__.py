"""Prefect flows, one per stage, the parent pipeline flow and the `blip2` command line.

Orchestration only: model math lives in `blip2_core`, SQL in `data_catalog`.
"""
