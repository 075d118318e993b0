"""Peers placeholder; replaced below."""
