"""``python -m lassfuzz``."""

from lassfuzz.cli.main import main

raise SystemExit(main())
