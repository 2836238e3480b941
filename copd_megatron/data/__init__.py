"""Tokenizers and prompt datasets."""
