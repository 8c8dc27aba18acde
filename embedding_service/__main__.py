import sys

from embedding_service.cli import main

sys.exit(main())
