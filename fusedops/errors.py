"""The exceptions fusedops raises for bad arguments. Each is the Python class that names the kind of
mistake (ValueError, TypeError, IndexError) and a RuntimeError too, the class PyTorch raises for many
of the same mistakes, so that code written against torch.nn catches them either way."""


class ArgumentValueError(ValueError, RuntimeError):
    """An argument of the right type with a wrong value or shape."""


class ArgumentTypeError(TypeError, RuntimeError):
    """An argument of the wrong type or dtype."""


class ArgumentIndexError(IndexError, RuntimeError):
    """A class index out of range."""


class ArgumentDtypeError(ArgumentTypeError, NotImplementedError):
    """A tensor of a dtype the op does not implement, where PyTorch raises NotImplementedError."""


class ArgumentEmptyError(ArgumentValueError, IndexError):
    """A dimension with nothing to index (no classes), where PyTorch raises IndexError."""
