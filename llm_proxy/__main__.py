"""Run the CLI as `python -m llm_proxy`."""

import sys

from .cli import main

sys.exit(main())
