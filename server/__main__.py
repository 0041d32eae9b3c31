"""``python -m server serve ...`` does what ``optiserve serve ...`` does."""

from server.cli import main

main()
