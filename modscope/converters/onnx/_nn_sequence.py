"""placeholder"""

from .registry import OpSet

ops = OpSet()
