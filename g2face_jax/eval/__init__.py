"""Evaluation: the G2Face paper's metrics and the report of `g2face eval`."""
