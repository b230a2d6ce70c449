"""The one exception type for mistakes a user can make; the CLI turns it into exit code 2."""


class DomgenError(Exception):
    """A user-caused problem (bad file, missing data, wrong flag), said in one sentence.

    The message names the file or flag and says what to do; it is printed without a traceback.
    """
