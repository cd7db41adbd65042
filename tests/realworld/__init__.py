"""Failure cases reproduced from public reports, run through the diagnosis."""
