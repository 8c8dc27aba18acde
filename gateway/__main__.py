"""`python -m gateway --targets 127.0.0.1:9000 --port 8080` (or GATEWAY_* variables)."""

import sys

from gateway.main import main

sys.exit(main())
