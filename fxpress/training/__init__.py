"""Training plumbing shared by the testbed trainer and quantization-aware training: one process or many
(torchrun + DistributedDataParallel), resumable checkpoints without pickle, progress."""
