"""Image values (paths, bytes, datasets Image values, URLs) and the row layouts that place them."""

from __future__ import annotations


import pytest

import vision_models as vm
from sftune.config import DataConfig
from sftune.data.contract import BadRow
from sftune.data.images import IMAGE, base_dir, conversation, load_image


@pytest.fixture
def png(tmp_path):
    (tmp_path / "img").mkdir()
    vm.image((30, 20), (0, 255, 0)).save(tmp_path / "img" / "a.png")
    return tmp_path


def test_every_kind_of_value_loads(png):
    raw = (png / "img" / "a.png").read_bytes()
    rel = load_image("img/a.png", png, "images", 0)  # relative to the data file's directory
    assert rel.size == (30, 20) and rel.getpixel((0, 0)) == (0, 255, 0)
    for value in (str(png / "img" / "a.png"), raw, {"bytes": raw, "path": None}, {"bytes": None, "path": "img/a.png"},
                  vm.image((30, 20), (0, 255, 0)).convert("L").convert("RGB")):
        im = load_image(value, png, "images", 0)
        assert im.mode == "RGB" and im.size == (30, 20)


@pytest.mark.parametrize("value, words", [
    ("https://example.com/cat.png", ["URL", "download the images"]),
    ("img/missing.png", ["no such file", "relative to the data file"]),
    (b"not an image", ["not an image PIL can read"]),
    (3, ["expected a file path"]),
    ({"path": None, "bytes": None}, ["neither 'bytes' nor 'path'"]),
])
def test_bad_values_are_clear(png, value, words):
    with pytest.raises(BadRow) as e:
        load_image(value, png, "images", 2)
    text = e.value.message + " " + (e.value.hint or "")
    assert "image 2" in e.value.message and all(w in text for w in words), text
    assert e.value.column == "images"


def test_base_dir_of_a_file_a_directory_and_a_glob(png):
    (png / "d.jsonl").write_text("")
    assert base_dir(str(png / "d.jsonl")) == png and base_dir(str(png)) == png
    assert base_dir(str(png / "*.jsonl")) == png and base_dir(None) is None


def _user(*parts):
    return [{"role": "user", "content": list(parts)}, {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]


def test_trl_layout_images_column_in_order():
    row = {"messages": _user({"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}), "images": ["x", "y"]}
    out, images = conversation(row, "messages", "images")
    assert out["messages"][0]["content"] == f"{IMAGE}a{IMAGE}" and out["messages"][1]["content"] == "ok"
    assert images == ["x", "y"]


def test_images_inside_their_parts():
    row = {"messages": _user({"type": "text", "text": "see"}, {"type": "image", "image": "p.png"})}
    out, images = conversation(row, "messages", "images")
    assert out["messages"][0]["content"] == f"see{IMAGE}" and images == ["p.png"]


def test_sharegpt_placeholders():
    row = {"conversations": [{"from": "human", "value": "<image>\nWhat is it? <image>"},
                             {"from": "gpt", "value": "two cats"}], "images": ["a", "b"]}
    out, images = conversation(row, "conversations", "images")
    assert out["conversations"][0]["value"] == f"{IMAGE}\nWhat is it? {IMAGE}" and images == ["a", "b"]


@pytest.mark.parametrize("row, words", [
    ({"messages": _user({"type": "image"}, {"type": "image"}), "images": ["a"]}, ["2 image place", "1 image(s)"]),
    ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}], "images": ["a"]},
     ["0 image place", "1 image(s)"]),
    ({"messages": _user({"type": "image", "image": "a"}), "images": ["b"]}, ["both inside"]),
    ({"messages": _user({"type": "audio"})}, ["type 'audio'"]),
])
def test_mismatches_are_bad_rows(row, words):
    column = "messages" if "messages" in row else "conversations"
    with pytest.raises(BadRow) as e:
        conversation(row, column, "images")
    assert all(w in e.value.message for w in words), e.value.message


def test_pixel_keys_are_validated():
    assert DataConfig(image_min_pixels=784, image_max_pixels=3136).image_max_pixels == 3136
    with pytest.raises(ValueError, match="image_min_pixels"):
        DataConfig(image_min_pixels=4000, image_max_pixels=3136)
    with pytest.raises(ValueError):
        DataConfig(image_max_pixels=0)
