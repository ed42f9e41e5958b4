"""Parallelism applied to single-device models: device mesh, FSDP2, TP, PP, CP, AC, compile, float8.

Every function here takes a model built by a modality (on the meta device) and changes how it runs;
model files never import torch.distributed (tests/test_house_rules.py).
"""
