"""Distillation helpers shared by training passes (QAT, pruning recovery): block features, taps."""
