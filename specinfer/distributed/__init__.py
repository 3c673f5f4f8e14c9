"""Several GPUs (or CPU processes): tensor parallelism over torch.distributed (parallel.py, sharding.py)."""
