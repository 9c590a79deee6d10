"""Full training runs (`python -m align.run`): launch, per-rank training, datasets, verdict.

launch.py starts the workers (torch's elastic launcher, as torchrun does), worker.py trains
one rank under mmengine's Runner, model.py makes a classifier or a torchvision detector an
mmengine model, datasets.py reads the data, metrics.py scores Top-1/5 and COCO box AP,
optim.py turns a Recipe into mmengine's optimizer wrapper and lr schedule, hooks.py
records epochs and shows progress, compat.py holds the workarounds for mmengine 0.10.7 on
torch >= 2.6, verdict.py judges the final figure against the documented one, result.py
writes and prints the result.
"""
