"""Structured pruning: removing dependency-group units and whole blocks, keeping the model whole."""
