"""Experiments a user runs to see how flowpress compares: the bench, the ablation, the precision table."""
