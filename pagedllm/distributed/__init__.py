"""Process groups on torch.distributed and the collectives tensor-parallel layers call."""
