"""Controlled experiments: the paper's failure mode and CPO's fix, reproducible from tools/."""
