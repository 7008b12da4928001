"""One module per ``stm-live`` command; ``stm_live/cli.py`` parses and dispatches to them."""


def given(**options) -> dict:
    """The options the user set (not None): the rest keep the called function's own defaults."""
    return {k: v for k, v in options.items() if v is not None}
