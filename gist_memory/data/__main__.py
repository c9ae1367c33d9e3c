"""`python -m gist_memory.data build OUT ...`: see `gist_memory.data.command`."""

from gist_memory.data.command import main

raise SystemExit(main())
