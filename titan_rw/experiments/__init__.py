"""Small, self-contained experiments that reproduce the paper's mechanisms on this machine."""
