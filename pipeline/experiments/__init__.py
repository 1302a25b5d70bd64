"""Drivers that chain many runs: student sweeps, the paper table, shared run bookkeeping."""
