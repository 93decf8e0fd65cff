"""The image formats the service accepts: one table for the decoder, the messages, the API
document, the page and the client (no imports, so the client can use it cheaply)."""

# Pillow's format name -> (the name people know it by, its file suffixes).
ACCEPTED = {
    "JPEG": ("JPEG", (".jpg", ".jpeg")),
    "PNG": ("PNG", (".png",)),
    "WEBP": ("WebP", (".webp",)),
    "GIF": ("GIF", (".gif",)),
    "BMP": ("BMP", (".bmp",)),
    "TIFF": ("TIFF", (".tif", ".tiff")),
    "AVIF": ("AVIF", (".avif",)),
}
PILLOW_FORMATS = tuple(ACCEPTED)
NAMES = ", ".join(name for name, _ in ACCEPTED.values())  # "JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF"
SUFFIXES = frozenset(s for _, suffixes in ACCEPTED.values() for s in suffixes)
