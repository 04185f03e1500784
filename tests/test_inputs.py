"""Images and prompt files read as users' tools read them (issue 31 part 4)."""

import json

import numpy as np
import pytest
from PIL import Image

from g2rpo.prompts import check_image, load_prompt_images, load_prompts, read_image


def test_a_utf8_bom_is_not_part_of_the_first_prompt(tmp_path):
    bom = "\ufeff"
    (tmp_path / "p.txt").write_text(bom + "a digit three\nthe digit seven\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.txt")) == ["a digit three", "the digit seven"]
    (tmp_path / "p.csv").write_text(bom + "prompt,note\na red cube,x\n", encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.csv")) == ["a red cube"]
    (tmp_path / "p.jsonl").write_text(bom + '{"prompt": "a cat"}\n', encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.jsonl")) == ["a cat"]
    (tmp_path / "p.json").write_text(bom + json.dumps(["a dog"]), encoding="utf-8")
    assert load_prompts(str(tmp_path / "p.json")) == ["a dog"]
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "i.csv").write_text(bom + f"prompt,image\na boat,{tmp_path / 'a.png'}\n", encoding="utf-8")
    assert list(load_prompt_images(str(tmp_path / "i.csv"))) == ["a boat"]


def test_a_json_prompt_file_with_a_syntax_error_is_named(tmp_path):
    (tmp_path / "bad.json").write_text('["a cat",\n "a dog"')
    with pytest.raises(ValueError, match=rf"{tmp_path / 'bad.json'}: not JSON \(.* at line 2"):
        load_prompts(str(tmp_path / "bad.json"))


def test_images_read_as_diffusers_load_image_reads_them(tmp_path):
    """EXIF orientation 6 (a phone's portrait photo stored landscape): 32 wide, 16 high on disk, shown (and read
    by diffusers.utils.load_image) 16 wide, 32 high."""
    from diffusers.utils import load_image

    pixels = np.zeros((16, 32, 3), dtype=np.uint8)
    pixels[:, :8] = (255, 0, 0)  # a red band on the left, as stored
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    ours, theirs = read_image(tmp_path / "rot.jpg"), load_image(str(tmp_path / "rot.jpg"))
    assert ours.size == theirs.size == (16, 32) and ours.mode == "RGB"
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def test_a_16_bit_png_keeps_its_grey_and_a_bomb_is_refused_by_name(tmp_path, monkeypatch):
    grey = np.full((4, 4), 32768, dtype=np.uint16)  # mid-grey in 16 bits: PIL's own conversion makes it white
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.asarray(read_image(tmp_path / "g16.png")).tolist() == np.full((4, 4, 3), 128).tolist()
    Image.new("RGB", (64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 4096 pixels > 2 x the limit: PIL's bomb error
    with pytest.raises(ValueError, match=rf"images\[0\]: image {tmp_path / 'big.png'} is too large to read safely"):
        check_image(tmp_path / "big.png", "images[0]")
