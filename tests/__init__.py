"""The test suite: one folder per layer of the package (layout, markers and the run's model cache:
conftest.py)."""
