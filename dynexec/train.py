"""``python -m dynexec.train``: the training stages (see dynexec.tools.train)."""
from .tools.train import main

if __name__ == "__main__":
    raise SystemExit(main())
