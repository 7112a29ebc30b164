"""Errors meant for the user: the message names the file, field or value at fault."""


class UserError(Exception):
    """Bad input from the user; the CLI prints the message without a traceback."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: names the file and what is wrong with it."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be read: names the file and what is wrong with it."""


class PeerLostError(UserError, RuntimeError):
    """Another process of a multi-process job crashed, was stopped or hangs: names this rank and what it saw.
    Not the user's input, but the CLI prints it the same way (no traceback: the cause is in the other's log)."""


class ImageError(UserError, ValueError):
    """An image that cannot be used: names the source (file, URL, data: URI, message part) and the problem (not an
    image, truncated, too large, too many)."""
