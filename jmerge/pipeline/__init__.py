"""pipeline"""
from .executor import *  # noqa
from .executor import __all__
