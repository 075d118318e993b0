"""Datasets: named, growing sets of items that runs copy from."""
