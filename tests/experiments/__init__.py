"""The applications: the digits demo and its model cache, label noise, the baselines, the
comparison harness and metrics, the model zoo, the official-SAP baseline, and the benchmark
scripts' smoke runs."""
