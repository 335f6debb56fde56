"""Schemathesis hooks for diracnet: what a valid image looks like.

JSON Schema can say "a binary string" or "a base64 string" but not "an image file": without
these hooks every schema-valid upload would be random bytes, which the server rightly refuses
(415 not_an_image), and the positive checks could never reach the model. The strategies draw
real image files from tests/fixtures/images (JPEG, PNG, GIF, BMP, WebP). Negative tests are
unaffected: they still send wrong types, missing fields and malformed bodies.
"""

import base64
import pathlib

import schemathesis
from hypothesis import strategies as st

ROOT = pathlib.Path(__file__).resolve().parents[2]
IMAGES = sorted(
    p.read_bytes()
    for p in (ROOT / "tests" / "fixtures" / "images").iterdir()
    if p.suffix in {".jpg", ".png", ".gif", ".bmp", ".webp"}
)
assert IMAGES, "no fixture images found"

image_files = st.sampled_from(IMAGES)

# Raw bodies: `image/*` and `application/octet-stream` (the schema's media types).
schemathesis.openapi.media_type("image/*", image_files, aliases=["application/octet-stream"])

# Multipart file parts (`format: binary`) and base64 image strings (`format: byte`).
schemathesis.openapi.format("binary", image_files)
schemathesis.openapi.format("byte", st.sampled_from([base64.b64encode(i).decode() for i in IMAGES]))
