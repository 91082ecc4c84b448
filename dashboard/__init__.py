"""Lumen review dashboard: a read-only Streamlit app over one atlas (see docs/dashboard.md).

Reads the atlas only through `precompute.store.Atlas`; imports no torch.
"""
