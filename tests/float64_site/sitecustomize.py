"""Put on ``PYTHONPATH`` by the tests that compare runs across process counts: every Python process of the run
(the launcher, torchrun's workers, ``main.py``) then creates its models, data and optimizer state in float64.

Why: one process at batch 2B and two processes at batch B sum the same gradients in another order. In float32 that
reordering alone moves the weights by ~1e-5 after a few AdamW steps, about 200 units of float32 rounding (2^-24), so
any fixed float32 tolerance is a guess about one machine's kernels. In float64 the same mechanism gives ~1e-14
(2^-53 rounding), and a comparison at 1e-9 separates rounding from a real difference (a sample in the wrong shard, a
gradient averaged twice) by five orders of magnitude on any machine.
"""
import torch

torch.set_default_dtype(torch.float64)
