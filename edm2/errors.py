"""The project's error base class and the one-line message rule every command follows.

Library code raises an `EDM2Error` subclass whose message names the file or flag at fault; command
lines turn it into a one-line click error (`edm2.commands.cli.fail`). Nothing here imports torch.
"""


class EDM2Error(ValueError):
    """Base class of every error this project raises on bad input (a `ValueError`, so callers that
    catch `ValueError` keep working)."""


def one_line(error) -> str:
    """A single-line message for an exception or a string: its last non-empty line (the informative
    one for chained library errors), or the exception's class name when it has no text."""
    text = str(error).strip()
    if not text:
        return type(error).__name__ if isinstance(error, BaseException) else 'error'
    return text.splitlines()[-1].strip()


def numpy_reason(error):
    """Why numpy could not read an .npy/.npz file, in a few words of ours: never its advice to load the file
    'unsafely' with allow_pickle (that would run code from the file)."""
    text = one_line(error)
    if 'Object arrays cannot be loaded' in text:
        return 'holds Python objects (an object array), which are never loaded'
    if 'pickle' in text.lower():
        return 'not a valid .npz file (damaged, or it holds pickled Python objects, which are never loaded)'
    return text
