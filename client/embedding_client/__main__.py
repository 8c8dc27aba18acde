import sys

from embedding_client.cli import main

sys.exit(main())
