"""The error every structured-output compiler raises on a spec it cannot serve."""


class GrammarError(ValueError):
    """A guided-decoding spec (regex, JSON schema, choice list) that is malformed or uses
    something unsupported; the message names what. The engine turns it into a 400."""
