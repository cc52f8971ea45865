"""data.resize: the standard ImageNet evaluation transform (resize the shorter side to size * 256 / 224, centre crop)
at 128 px and above, the whole-image resize ("squash") below, through every decoding path (no Ray)."""

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from engine.config import ConfigError, DataConfig, load_config
from engine.data.images import (
    decode_image_bytes,
    decode_rows,
    load_split,
    resize_mode,
    sample_split,
    to_rgb_square,
)

SIDE, CENTRE = (255, 0, 0), (0, 0, 255)


def thirds(width: int, height: int) -> Image.Image:
    """Side colour on the outer thirds of the longer axis, the centre colour in the middle third."""
    pixels = np.zeros((height, width, 3), np.uint8)
    pixels[:] = SIDE
    if width >= height:
        pixels[:, width // 3: 2 * width // 3] = CENTRE
    else:
        pixels[height // 3: 2 * height // 3] = CENTRE
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (300, 300), (7, 31), (1, 1), (2000, 1500)])
@pytest.mark.parametrize("size", [224, 128, 512])
def test_center_crop_gives_a_square_of_the_size(width, height, size):
    out = to_rgb_square(noise(width, height), size, "center_crop")
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


@pytest.mark.parametrize("width, height", [(600, 200), (200, 600)])
def test_center_crop_takes_the_centre_and_squash_keeps_the_sides(width, height):
    image = thirds(width, height)
    cropped = to_rgb_square(image, 224, "center_crop")
    corners = cropped[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == CENTRE).all()  # 3:1 -> 768 x 256, then its centre 224: inside the middle third
    squashed = to_rgb_square(image, 224, "squash")
    assert (squashed[[0, 0, -1, -1], [0, -1, 0, -1]] == SIDE).all()


def test_a_256_square_at_224_is_its_centre_without_the_16_px_borders():
    image = noise(256, 256)
    expected = np.asarray(image.resize((256, 256), Image.BILINEAR))[16:240, 16:240]
    assert (to_rgb_square(image, 224, "center_crop") == expected).all()


def test_center_crop_is_resize_then_crop_as_torchvision():
    image = noise(500, 375)  # shorter side 375 -> 256, longer int(256 * 500 / 375) = 341; crop offsets 58, 16
    expected = np.asarray(image.resize((341, 256), Image.BILINEAR).crop((58, 16, 282, 240)))
    assert (to_rgb_square(image, 224, "center_crop") == expected).all()


def test_an_extreme_aspect_ratio_is_cropped_without_resizing_it_whole():
    image = thirds(30_000, 3)  # whole: 2,560,000 x 256 pixels; only the crop's box is resampled
    out = to_rgb_square(image, 224, "center_crop")
    assert out.shape == (224, 224, 3) and (out == CENTRE).all()


@pytest.mark.parametrize("width, height, size", [(12, 10, 16), (28, 28, 28), (31, 7, 32), (500, 375, 224)])
def test_squash_is_the_whole_image_resized(width, height, size):
    image = noise(width, height)
    expected = np.asarray(image.resize((size, size), Image.BILINEAR))
    assert (to_rgb_square(image, size) == expected).all()
    assert (to_rgb_square(image, size, "squash") == expected).all()
    assert (decode_image_bytes(png(image), size) == expected).all()


@pytest.mark.parametrize("size, mode", [(16, "squash"), (28, "squash"), (32, "squash"), (64, "squash"),
                                        (124, "squash"), (128, "center_crop"), (224, "center_crop"),
                                        (256, "center_crop")])
def test_auto_center_crops_from_128_px(size, mode):
    assert resize_mode(DataConfig(image_size=size)) == mode
    assert resize_mode(DataConfig(image_size=size, resize="squash")) == "squash"
    assert resize_mode(DataConfig(image_size=size, resize="center_crop")) == "center_crop"
    assert resize_mode(load_config(None, [f"data.image_size={size}"]).data) == mode  # a loaded config's data


def test_a_bad_resize_value_is_rejected_with_the_key():
    with pytest.raises(ConfigError, match=r"data\.resize.*'crop'.*auto.*squash.*center_crop"):
        load_config(None, ["data.resize=crop"])
    assert load_config(None, ["data.resize=center_crop"]).data.resize == "center_crop"
    with pytest.raises(ConfigError, match=r"data\.resize"):  # built in code, past load_config's checks
        resize_mode(DataConfig(resize="crop"))


def test_a_bad_mode_is_an_error_not_a_corrupt_row():
    rows = {"image": [{"bytes": png(noise(10, 10)), "path": "a.png"}], "label": [0]}
    for call in (lambda: decode_rows(rows, 16, mode="auto"), lambda: decode_image_bytes(png(noise(4, 4)), 16,
                                                                                         mode="crop")):
        with pytest.raises(ValueError, match="resize mode"):
            call()


def test_the_mode_reaches_every_decoding_path(tmp_path):
    images = [thirds(600, 200), thirds(200, 600), noise(300, 300)]
    rows = {"image": [{"bytes": png(im), "path": f"train/{i}.png"} for i, im in enumerate(images)],
            "label": [0, 1, 0]}
    expected = {mode: np.stack([to_rgb_square(im, 128, mode) for im in images]) for mode in ("squash", "center_crop")}
    for mode, pixels in expected.items():
        assert (decode_rows(rows, 128, 2, mode=mode)[0]["image"] == pixels).all()
        assert (decode_rows(rows, 128, 2, mode=mode)[0]["image"] == pixels).all()
    pq.write_table(pa.table({"image": pa.array(rows["image"]), "label": pa.array(rows["label"], pa.int64())}),
                   tmp_path / "train-00000-of-00001.parquet")
    (tmp_path / "classes.txt").write_text("a\nb\n")
    for resize, mode in (("auto", "center_crop"), ("squash", "squash"), ("center_crop", "center_crop")):
        config = DataConfig(source="parquet", path=str(tmp_path), image_size=128, resize=resize)
        whole = load_split(config, "train")
        assert (whole.images == expected[mode]).all()
        sample = sample_split(config, "train", 2, seed=0)  # one per class, by sample key
        position = {i: n for n, i in enumerate(whole.ids)}
        assert (sample.images == whole.images[[position[i] for i in sample.ids]]).all()
