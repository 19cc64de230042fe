"""One exception type for problems the user can fix; the CLI prints it as a single line."""


class PuzzleError(Exception):
    """Bad input (missing file, wrong config field, infeasible budget...): message says what and how."""
