"""``python -m sap_fast.info``: what the native build holds and what each stage will use."""
import json

from .backends.info import backend_info

__all__ = []

if __name__ == "__main__":
    print(json.dumps(backend_info(), indent=2, ensure_ascii=False))
