"""Evaluating a run at many guidance scales: the loop every rank walks, and the rows it writes."""
