"""``python -m dynexec.eval``: accuracy and the official metrics (see dynexec.tools.eval)."""
from .tools.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
