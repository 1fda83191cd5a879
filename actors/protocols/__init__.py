"""Client wire protocols (xiaozhi, native) and their codecs."""
