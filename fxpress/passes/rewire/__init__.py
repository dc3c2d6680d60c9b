"""Adapter and auxiliary-branch rewiring: insert LoRA branches, set their scale, strip and fuse them."""
