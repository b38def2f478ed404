"""Placement: which node holds which decoder layers (the planner), what a hop costs (the link
model), and when the running plan is far enough from what it predicted to re-plan (balance).
Pure: no clock, no I/O, no torch (design §6, docs/placement.md)."""
