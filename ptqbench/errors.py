"""User-facing errors. A BadInput becomes one line on stderr and exit code 2 in the CLI."""


class BadInput(ValueError):
    """Bad user input: the message names the bad value and what is accepted."""


def one_of(what: str, value, accepted) -> BadInput:
    accepted = ", ".join(str(a) for a in accepted)
    return BadInput(f"{what} {value!r} is not accepted; accepted: {accepted}")


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and its message with whitespace collapsed."""
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__
