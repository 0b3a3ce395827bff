"""Run the CLI as `python -m llm_proxy`."""

import sys

from llm_proxy.ops.cli import main

sys.exit(main())
