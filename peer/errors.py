"""The one error type that reaches the user as a single line on stderr (exit code 2, no traceback)."""


class UserError(Exception):
    """A problem the user can fix. The message names the problem *and* the fix, in one line."""

    exit_code = 2


class InputError(UserError):
    """What library code raises about something it was given (a path, a data source): ``"<what>: <problem>; <fix>"``,
    never naming a command-line flag, which the library does not know. The command that passed it adds the flag::

        except InputError as e:
            raise e.with_flag("--data") from None   # "--data corpus.txt: file is empty; pass a file with text in it"
    """

    def __init__(self, what: object, problem: str):
        super().__init__(f"{what}: {problem}")
        self.what, self.problem = str(what), problem

    def with_flag(self, flag: str) -> UserError:
        """The same message led by the flag the input came from."""
        return UserError(f"{flag} {self}")
