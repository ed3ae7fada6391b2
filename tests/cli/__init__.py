"""The ``sap-fast`` command, its run report and its file writes."""
