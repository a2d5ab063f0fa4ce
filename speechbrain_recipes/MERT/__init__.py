"""MERT pretraining recipe: ``python train.py hparams/mert.yaml`` (see README.md)."""
