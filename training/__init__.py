"""Training both stages: the training step as phase functions shared with the conformance check (steps),
and what train_CNeRF.py and train_Full.py share around it (utils)."""
