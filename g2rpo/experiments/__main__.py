"""`python -m g2rpo.experiments compare ...`."""

from .cli import main

main()
