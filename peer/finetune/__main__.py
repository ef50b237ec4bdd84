import sys

from peer.finetune.cli import main

sys.exit(main())
