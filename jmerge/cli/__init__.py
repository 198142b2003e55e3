from .main import main, parse_size
__all__ = ["main", "parse_size"]
