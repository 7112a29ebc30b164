"""Errors meant for the user: the message names the file, field or value at fault."""


class UserError(Exception):
    """Bad input from the user; the CLI prints the message without a traceback."""


class CheckpointError(UserError, ValueError):
    """A checkpoint that cannot be read: names the file and what is wrong with it."""


class TokenizerError(UserError, ValueError):
    """A tokenizer file that cannot be read: names the file and what is wrong with it."""


class ImageError(UserError, ValueError):
    """An image that cannot be used: names the source (file, URL, data: URI, message part) and the problem (not an
    image, truncated, too large, too many)."""
