"""One module per CLI command: `add_arguments(parser)` and `run(args) -> int`."""


def options_describe(given: list[str]) -> str:
    """'--a describes', '--a and --b describe', '--a, --b and --c describe': options named in a sentence."""
    if len(given) == 1:
        return f"{given[0]} describes"
    return f"{', '.join(given[:-1])} and {given[-1]} describe"


def refuse_without(given: list[str], describes: str, missing: str, add: str, note: str = "") -> None:
    """Refuse the options in `given` (those the user gave) when the option they describe, `missing`,
    was not given: one wording for every command, naming only what was given."""
    if not given:
        return
    from edgeshort.errors import InputError

    pronoun = "it" if len(given) == 1 else "them"
    raise InputError(f"{options_describe(given)} {describes}, and {missing} was not given; add {add}, or leave "
                     f"{pronoun} out{note}")
