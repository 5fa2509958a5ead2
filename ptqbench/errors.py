"""User-facing errors. A BadInput becomes one line on stderr and exit code 2 in the CLI."""


class BadInput(ValueError):
    """Bad user input: the message names the bad value and what is accepted."""


def one_of(what: str, value, accepted) -> BadInput:
    accepted = ", ".join(str(a) for a in accepted)
    return BadInput(f"{what} {value!r} is not accepted; accepted: {accepted}")
