"""``python -m sap_fast.info``: :func:`sap_fast.backend_info` as JSON (what was built, and each
stage's choice with the skipped implementations' reasons); ``sap-fast info`` prints it as text."""
import json

from .backends.info import backend_info

__all__ = []

if __name__ == "__main__":
    print(json.dumps(backend_info(), indent=2, ensure_ascii=False))
