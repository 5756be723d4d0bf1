"""What the safe loader raises. Every message starts with the file's name and says what was refused."""
from __future__ import annotations

from ..errors import FxRewriteError


class LoadError(FxRewriteError, ValueError):
    """A torch file cannot be loaded safely: it is damaged, or it asks for something that is not allowed.

    Nothing from the file was executed. The message names the file and the problem.
    """


class RefusedGlobal(LoadError):
    """The pickle names a global (class or function) that the allow-list does not hold.

    ``name`` is the dotted name as the pickle spells it (after Python 2 names are
    mapped to Python 3 ones); ``pickle`` holds the pickle's bytes, so a caller can
    list every global it references (:func:`fxrewrite.serialization.pickle_globals`)
    to explain the refusal in its own terms.
    """

    def __init__(self, message: str, name: str, pickle: bytes = b""):
        super().__init__(message)
        self.name = name
        self.pickle = pickle
