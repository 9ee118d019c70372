"""The one exception type for mistakes a user can make (bad input, unknown names, missing weights).

Front ends catch it once: the CLI prints the message and exits with code 2, a page shows st.error.
Anything else is a bug and keeps its traceback (in the log, not in the user's face).
"""


class UserError(Exception):
    """An error caused by the user's input, with a message meant for them."""
