"""The training job: loop.py (synchronous, single process or DDP), checkpoint.py, logs.py."""
