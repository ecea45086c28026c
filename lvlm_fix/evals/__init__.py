"""POPE and CHAIR metrics, and the method comparison report."""
