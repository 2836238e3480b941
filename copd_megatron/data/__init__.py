"""Data: tokenizers (SentencePiece / Hugging Face, one interface) and prompt datasets
(typed samples, JSONL/Parquet loading with FILE:LINE errors, resumable shuffled streams)."""
