"""The demo's honest evaluation: patients held out of every training step, and the
AUROC table of their predictions."""
