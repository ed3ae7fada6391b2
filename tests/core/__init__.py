"""The SAP core: selection, capture, statistics, spectra, solvers, projection, sweep, the
distributed path and the materialising reference."""
