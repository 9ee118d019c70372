"""The one exception type for mistakes a user can make (bad input, unknown names, missing weights).

Front ends catch it once: the CLI prints the message and exits with code 2, a page shows st.error.
Anything else is a bug and keeps its traceback (in the log, not in the user's face).
"""


class UserError(Exception):
    """An error caused by the user's input, with a message meant for them.

    `str(error)` is the message in the command line's words (its flags); `page`, where given, is
    the same message in the web pages' words (their options and buttons), and `api` in the HTTP
    API's (its JSON field names). Where they would say the same, `page` and `api` are left out and
    `for_page` and `for_api` give the one message.
    """

    def __init__(self, message: str, *, page: str | None = None, api: str | None = None):
        super().__init__(message)
        self.page = page
        self.api = api

    def for_page(self) -> str:
        return self.page or str(self)

    def for_api(self) -> str:
        return self.api or str(self)
