"""Pseudo-labels, hard negatives, selection quality and the hard-negative mining loop (HNM-WSI)."""
