"""Write docs/config.md, the config reference, from the config dataclasses (cpo_jax/train/config.py).

    python tools/gen_config_docs.py           # rewrite docs/config.md
    python tools/gen_config_docs.py --check   # exit 1 when docs/config.md is out of date

Each key's description is the docstring written under its field; tests/test_newcomer_cli.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cpo_jax.train.config_doc import render_markdown  # noqa: E402

DOC = REPO / "docs" / "config.md"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 when docs/config.md differs")
    args = parser.parse_args()
    text = render_markdown()
    if args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
