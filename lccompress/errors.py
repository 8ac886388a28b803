"""Exceptions raised by lccompress. Each names the bad value and what is allowed."""


class LCError(Exception):
    """Base class of every error lccompress raises on purpose."""


class ConfigError(LCError, ValueError):
    """A hyperparameter, recipe or option has a value that is not allowed."""


class DivergenceError(LCError, RuntimeError):
    """Training produced non-finite values again after the learning rate was halved 3 times."""


class NotConverged(ConfigError):
    """A fixed point (an implicit layer's state or its adjoint) did not converge: the weights have
    left the region where it is well-posed. Inside training, the NaN guard treats it as a
    divergence (the last good state restored, the learning rate halved)."""
