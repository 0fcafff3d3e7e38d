"""The one error type a user meets: it says what is wrong, where, and what to do."""


class LineInspectError(Exception):
    """A problem the user can fix (bad file, bad folder, bad flag). The CLI prints it on one
    line and exits with status 2; the server turns it into INVALID_ARGUMENT."""
