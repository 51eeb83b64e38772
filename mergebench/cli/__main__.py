"""`python -m mergebench.cli`: the same as the `mergebench` script."""

from mergebench.cli.core import main

main()
