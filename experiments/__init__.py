"""The paper's experiments: embedding and aggregation ablations, the leakage experiment, and their reports."""
