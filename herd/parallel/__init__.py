"""Parallelism applied to single-device models: device mesh, FSDP2, TP, PP, CP, AC, compile, float8.

Generic code only: every function here takes a model built by a task (on the meta device) and the model
family's parallel plan (`herd.parallel.plan.ParallelPlan`, declared in `herd/plans/`), and changes how it
runs. Nothing here names a model class or imports a task, the trainer or data (tests/test_layering.py);
model files never import torch.distributed (tests/test_house_rules.py).
"""
