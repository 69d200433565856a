"""Integer arithmetic the engine and the layers share."""


def ceil_div(numerator: int, denominator: int) -> int:
    """⌈numerator / denominator⌉ for a positive denominator, exact for any size of integer."""
    return -(-numerator // denominator)
