"""Qwen3-VL and Qwen2.5-VL in Megatron-Core terms: a ViT tower, a GPT language model with
multimodal RoPE, and the glue between them (see ``model.py``)."""
