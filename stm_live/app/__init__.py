"""One module per ``stm-live`` command; ``stm_live/cli.py`` parses and dispatches to them."""
