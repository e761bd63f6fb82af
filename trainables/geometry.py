"""The decoded cache's geometry: images are decoded with room for the crops a model input needs."""

CROP_RATIO = 0.875  # torchvision's classification reference: resize 256, crop 224


def decode_size(image_size: int) -> int:
    """The short side images are decoded to for a model input of ``image_size``."""
    return round(image_size / CROP_RATIO)


def crop_size(decoded: int) -> int:
    """The ``image_size`` whose decode size is ``decoded``: ``decode_size`` grows by more
    than 1 per step of 1, so its inverse is unique (|rounding error| * 0.875 < 0.5)."""
    return round(decoded * CROP_RATIO)
