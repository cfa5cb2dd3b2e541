"""factory.data.images (the one image opener of training, eval and chat) and LLaVA's pad colour and placement:
high-bit-depth modes, aspect-ratio and decompression-bomb limits, paths outside image_folder."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from factory.data import LlavaJsonDataset
from factory.data.images import DEFAULT_MAX_ASPECT_RATIO, open_image, resolve_in_folder, to_rgb
from factory.errors import FactoryError
from factory.model.vision.base import CLIP_MEAN, HALF, pad_colour, pad_to_square
from factory.testing import tiny_tokenizer


def png_header_only(path, width, height):
    """A valid PNG header claiming width×height with (almost) no pixel data: PIL reads the size without decoding,
    so a decompression bomb can be tested without allocating it."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16))
                     + chunk(b"IEND", b""))
    return path


def pixels(image):
    return np.asarray(image, dtype=np.int64)


# ------------------------------------------------------------------------------------------------ modes → RGB
def test_16_bit_png_is_scaled_not_clipped_to_white(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode == "I;16"
        assert pixels(raw.convert("RGB"))[0, 1:, 0].tolist() == [255, 255, 255]  # PIL's own convert: white
    image = open_image(str(tmp_path / "deep.png"))
    assert image.mode == "RGB" and image.size == (4, 2)
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.int64)
    assert pixels(image)[..., 0].tolist() == expected.tolist() == [[0, 1, 128, 255], [4, 78, 156, 233]]
    assert (pixels(image)[..., 0] == pixels(image)[..., 2]).all()  # grey stays grey


@pytest.mark.parametrize("mode, raw, expected", [
    ("I;16B", np.array([[0, 65535, 32768]], dtype=">u2"), [0, 255, 128]),
    ("I", np.array([[0, 100, 255]], dtype=np.int32), [0, 100, 255]),          # 8-bit data kept
    ("I", np.array([[0, 65535, 13107]], dtype=np.int32), [0, 255, 51]),      # 16-bit data scaled
    ("F", np.array([[0.0, 1.0, 0.5]], dtype=np.float32), [0, 255, 128]),     # [0, 1] floats
    ("F", np.array([[0.0, 255.0, 17.0]], dtype=np.float32), [0, 255, 17]),   # [0, 255] floats
    ("F", np.array([[np.nan, 1000.0, 500.0]], dtype=np.float32), [0, 255, 128]),
])
def test_high_bit_depth_modes(mode, raw, expected):
    image = Image.frombytes(mode, (raw.shape[1], 1), raw.tobytes())
    assert image.mode == mode
    assert pixels(to_rgb(image))[0, :, 1].tolist() == expected


def test_8_bit_modes_convert_like_llava():
    """RGBA, LA, P (with transparency), CMYK, L, 1 → exactly PIL's convert('RGB'), what LLaVA's loader does."""
    rgba = Image.new("RGBA", (2, 1), (200, 100, 50, 0))
    palette = Image.new("P", (2, 1), 3)
    palette.putpalette([i % 256 for i in range(768)])
    palette.info["transparency"] = 3
    cases = [rgba, Image.new("LA", (2, 1), (90, 10)), palette, Image.new("CMYK", (2, 1), (0, 255, 0, 0)),
             Image.new("L", (2, 1), 77), Image.new("1", (2, 1), 1), Image.new("RGB", (2, 1), (1, 2, 3))]
    for image in cases:
        converted = to_rgb(image)
        assert converted.mode == "RGB"
        assert pixels(converted).tolist() == pixels(image.convert("RGB")).tolist(), image.mode
    assert pixels(to_rgb(rgba))[0, 0].tolist() == [200, 100, 50]  # alpha dropped, not composited


def test_unreadable_and_truncated_files(tmp_path):
    (tmp_path / "text.jpg").write_text("<html>not found</html>")
    Image.new("RGB", (32, 32), (10, 200, 30)).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for name, reason in (("text.jpg", "UnidentifiedImageError"), ("cut.jpg", "truncated")):
        with pytest.raises(FactoryError) as err:
            open_image(str(tmp_path / name), " of sample id 's1'")
        message = str(err.value)
        assert message.startswith(f"Cannot read image {tmp_path / name} of sample id 's1': ") and reason in message
        assert "Replace the file or remove the sample." in message


# ------------------------------------------------------------------------------------- size limits
def test_decompression_bombs_are_refused_before_decoding(tmp_path):
    limit = Image.MAX_IMAGE_PIXELS
    # above 2× the limit PIL raises DecompressionBombError itself; between 1× and 2× it only warns
    for width, height in ((20000, 20000), (10000, 9000)):
        path = png_header_only(tmp_path / f"bomb_{width}.png", width, height)
        assert width * height > limit
        with pytest.warns() if width * height <= 2 * limit else _no_warning_check():
            with pytest.raises(FactoryError) as err:
                open_image(str(path), " of sample id 'b'")
        message = str(err.value)
        assert str(path) in message and "sample id 'b'" in message and "decompression bomb" in message
        assert "Downscale" in message
    small = png_header_only(tmp_path / "small.png", 40, 30)
    with pytest.raises(FactoryError, match="above the decompression-bomb limit of 1,000 pixels"):
        open_image(str(small), max_pixels=1000)


class _no_warning_check:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_thin_strip_is_refused_for_its_aspect_ratio(tmp_path):
    Image.new("RGB", (25000, 1), (255, 0, 0)).save(tmp_path / "strip.png")
    assert (tmp_path / "strip.png").stat().st_size < 1000
    with pytest.raises(FactoryError) as err:
        open_image(str(tmp_path / "strip.png"), " of sample id 'thin'")
    assert str(err.value) == (
        f"Image {tmp_path / 'strip.png'} of sample id 'thin' is 25000×1, an aspect ratio of 2.5e+04:1, above "
        f"data.max_aspect_ratio={DEFAULT_MAX_ASPECT_RATIO:g}: padding it to a square (image_aspect=pad) would need "
        f"a 25000×25000 canvas and resizing would squash it beyond recognition. Crop or remove the image, or raise "
        f"data.max_aspect_ratio.")
    assert open_image(str(tmp_path / "strip.png"), max_aspect_ratio=None).size == (25000, 1)
    Image.new("RGB", (40, 2), 0).save(tmp_path / "ok.png")  # exactly 20:1 is allowed
    assert open_image(str(tmp_path / "ok.png")).size == (40, 2)


def test_pad_refuses_a_canvas_above_the_pixel_limit():
    strip = Image.new("RGB", (25000, 1))
    with pytest.raises(FactoryError, match=r"needs a 25000×25000 canvas, above the decompression-bomb limit"):
        pad_to_square(strip, (0, 0, 0))


# ----------------------------------------------------------------------------------------- pad colour
def test_pad_colour_is_llavas_truncated_mean():
    assert pad_colour(CLIP_MEAN) == (122, 116, 104)
    assert pad_colour(HALF) == (127, 127, 127)


def test_pad_places_the_image_like_expand2square():
    """LLaVA's expand2square: width > height pastes at (0, (w - h) // 2), else at ((h - w) // 2, 0)."""
    wide = Image.new("RGB", (6, 3), (255, 0, 0))
    out = pixels(pad_to_square(wide, pad_colour(CLIP_MEAN)))
    assert out.shape == (6, 6, 3)
    rows = [tuple(out[r, 0]) for r in range(6)]
    assert rows == [(122, 116, 104)] + [(255, 0, 0)] * 3 + [(122, 116, 104)] * 2  # offset (6 - 3) // 2 = 1
    tall = Image.new("RGB", (2, 5), (0, 0, 255))
    out = pixels(pad_to_square(tall, pad_colour(HALF)))
    assert [tuple(out[0, c]) for c in range(5)] == [(127, 127, 127)] + [(0, 0, 255)] * 2 + [(127, 127, 127)] * 2
    square = Image.new("RGB", (3, 3), (1, 2, 3))
    assert pad_to_square(square, (0, 0, 0)) is square


def test_encoder_transform_pads_with_the_llava_colour():
    from factory.testing import tiny_model

    encoder = tiny_model().vision
    image = Image.new("RGB", (64, 16), (255, 255, 255))
    out = encoder.image_transform(image)
    mean = torch.tensor(encoder.image_mean).view(3)
    std = torch.tensor(encoder.image_std).view(3)
    expected = (torch.tensor(pad_colour(encoder.image_mean), dtype=torch.float32) / 255 - mean) / std
    assert torch.allclose(out[:, 0, 0], expected, atol=1e-6)  # the top-left corner is padding
    assert not torch.allclose(out[:, 0, 0], torch.zeros(3), atol=1e-3)  # round(mean*255) would give ≈ 0


# -------------------------------------------------------------------------- paths outside image_folder
def test_resolve_in_folder(tmp_path):
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    (folder / "link.png").symlink_to(tmp_path / "secret.png")
    (folder / "sub" / "a.png").write_bytes(b"x")
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "b.png").write_bytes(b"x")
    (folder / "coco").symlink_to(tmp_path / "store")  # a linked sub-folder leads out as well
    assert resolve_in_folder(str(folder), "sub/a.png") == str(folder / "sub" / "a.png")
    assert resolve_in_folder(str(folder), "sub/../sub/a.png").endswith("a.png")  # stays inside: fine
    linked_folder = tmp_path / "linked"
    linked_folder.symlink_to(folder)  # an image_folder that is itself a link is fine
    assert resolve_in_folder(str(linked_folder), "sub/a.png") == str(linked_folder / "sub" / "a.png")
    for name, how in (("../secret.png", "climbs out with '..'"), (str(tmp_path / "secret.png"), "is an absolute path"),
                      ("link.png", f"leads through a symlink to {tmp_path / 'secret.png'}"),
                      ("coco/b.png", f"leads through a symlink to {tmp_path / 'store' / 'b.png'}"),
                      ("coco/../../secret.png", "climbs out with '..'")):
        with pytest.raises(FactoryError) as err:
            resolve_in_folder(str(folder), name, context=" of sample id 'p'")
        assert str(err.value).startswith(f"Image path {name!r} of sample id 'p' {how}, outside image_folder {folder}")
        assert "data.allow_outside_paths=true" in str(err.value)
        assert resolve_in_folder(str(folder), name, allow_outside=True) == str(folder / name)


def _dataset(tmp_path, image_names, **options):
    entries = [{"id": f"s{i}", "image": name, "conversations": [{"from": "human", "value": "<image>\nColour?"},
                                                                  {"from": "gpt", "value": "Red."}]}
               for i, name in enumerate(image_names)]
    (tmp_path / "data.json").write_text(json.dumps(entries))
    transform = (lambda image: torch.from_numpy(np.asarray(image.resize((4, 4)), dtype=np.float32)).permute(2, 0, 1))
    return LlavaJsonDataset(tmp_path / "data.json", tmp_path / "images", tiny_tokenizer(), "phi", transform, 2,
                            **options)


def test_dataset_refuses_outside_paths_at_build_unless_allowed(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "images" / "in.png")
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "out.png")
    for bad in ("../out.png", str(tmp_path / "out.png")):
        with pytest.raises(FactoryError) as err:
            _dataset(tmp_path, ["in.png", bad])
        assert f"Image path {bad!r} of sample id 's1' ({tmp_path / 'data.json'}, entry 1)" in str(err.value)
        ds = _dataset(tmp_path, ["in.png", bad], allow_outside_paths=True)
        assert ds[1]["pixel_values"][1, 0, 0] == 255  # the green image outside the folder was read


def test_dataset_names_the_sample_of_a_thin_strip(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (25000, 1)).save(tmp_path / "images" / "strip.png")
    ds = _dataset(tmp_path, ["strip.png"])
    with pytest.raises(FactoryError) as err:
        ds[0]
    assert f"of sample id 's0' ({tmp_path / 'data.json'}, entry 0) is 25000×1" in str(err.value)
    ds = _dataset(tmp_path, ["strip.png"], max_aspect_ratio=30000)
    assert ds[0]["pixel_values"].shape == (3, 4, 4)  # a transform that resizes (no pad) is then fine


# ---------------------------------------------------------------------- the same opener in dataset, eval, chat
def test_bomb_is_a_clear_error_in_dataset_eval_and_chat(tmp_path):
    from factory.eval.chat import ChatSession
    from factory.eval.generate import load_pixels
    from factory.testing import tiny_model

    (tmp_path / "images").mkdir()
    bomb = png_header_only(tmp_path / "images" / "bomb.png", 20000, 20000)
    with pytest.raises(FactoryError) as err:
        _dataset(tmp_path, ["bomb.png"])[0]
    assert "sample id 's0'" in str(err.value) and "decompression bomb" in str(err.value)
    model = tiny_model()
    with pytest.raises(FactoryError) as err:
        load_pixels(model, tmp_path / "images", "bomb.png")
    assert str(bomb) in str(err.value) and "decompression bomb" in str(err.value)
    with pytest.raises(FactoryError) as err:
        ChatSession(model, image=str(bomb))
    assert str(bomb) in str(err.value) and "decompression bomb" in str(err.value)
    deep = np.full((8, 8), 65535, dtype=np.uint16)
    deep[:4] = 0
    Image.fromarray(deep).save(tmp_path / "images" / "deep.png")
    values = load_pixels(model, tmp_path / "images", "deep.png")  # eval sees the 16-bit image, not a white square
    assert values.shape[0] == 3 and float(values.min()) < float(values.max()) - 1.0
