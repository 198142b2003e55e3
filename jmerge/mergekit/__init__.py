"""mergekit"""
from .config import *  # noqa
from .config import __all__
