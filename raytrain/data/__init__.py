"""Shards -> Ray Datasets (driver) and deterministic batch streams (workers)."""
