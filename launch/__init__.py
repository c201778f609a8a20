"""Launchers: turn a machine (or, later, a Slurm allocation) into ranks running `megamor`."""
