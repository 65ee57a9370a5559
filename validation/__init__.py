"""The publish gate: Great Expectations suites and thresholds for embedding snapshots and training sets."""
