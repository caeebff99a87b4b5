"""The command line: a thin Typer layer over the library. Each command calls the
library and renders what it returns; errors become one line and an exit code."""


def main() -> None:
    """The ``weightship`` console script."""
    from weightship.cli.app import main as run

    run()
