"""One module per CLI command: `add_arguments(parser)` and `run(args) -> int`."""


def refuse_without(given: list[str], describes: str, missing: str, add: str, note: str = "") -> None:
    """Refuse the options in `given` (those the user gave) when the option they describe, `missing`,
    was not given: one wording for every command, naming only what was given."""
    if not given:
        return
    from edgeshort.errors import InputError

    names = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
    verb, pronoun = ("describes", "it") if len(given) == 1 else ("describe", "them")
    raise InputError(f"{names} {verb} {describes}, and {missing} was not given; add {add}, or leave {pronoun} out{note}")
