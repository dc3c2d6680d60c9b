"""Reward fine-tuning passes (TextCraftor, PAPERS.md §4): tune a model on differentiable rewards of its samples."""
