"""Experiment tracking behind one small interface (W&B offline by default, or nothing)."""
