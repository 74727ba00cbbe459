"""Structured pruning maths: importance scores, unit selection, the schedule and the surgery."""
