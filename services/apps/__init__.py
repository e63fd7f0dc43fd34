"""The apps on top of the services: the demo, held-out scoring, the local stack."""
