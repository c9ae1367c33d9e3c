"""`python -m gist_memory.data build OUT ...`: see `gist_memory.data.command`."""

from gist_memory.data.command import main

if __name__ == "__main__":
    raise SystemExit(main())
