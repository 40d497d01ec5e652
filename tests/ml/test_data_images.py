"""Scanning folders and opening images safely."""
import numpy as np
import pytest
from PIL import Image

from app.ml.data.errors import DataError
from app.ml.data.images import (
    open_image_rgb,
    open_mask,
    parse_kohya_folder,
    read_image_size,
    scan_images,
    verify_image,
)
from data_helpers import write_image, write_truncated_jpeg


def test_scan_finds_all_formats_case_insensitive_recursive_sorted(tmp_path):
    for name in ["b.PNG", "a.jpg", "c.JPEG", "d.webp", "e.bmp", "sub/f.png", "notes.txt", "x.gif", ".hidden.png"]:
        if name.endswith((".txt",)):
            (tmp_path / name).write_text("hi")
        else:
            write_image(tmp_path / name, fmt={"gif": "GIF"}.get(name.rsplit(".", 1)[1].lower()))
    files = scan_images(tmp_path)
    assert [f.rel for f in files] == ["a.jpg", "b.PNG", "c.JPEG", "d.webp", "e.bmp", "sub/f.png"]
    assert scan_images(tmp_path, recursive=False)[-1].rel == "e.bmp"


def test_masks_pair_and_are_never_training_images(tmp_path):
    write_image(tmp_path / "cat.jpg")
    write_image(tmp_path / "cat-masklabel.png")
    write_image(tmp_path / "dog.png")
    files = scan_images(tmp_path)
    assert [f.rel for f in files] == ["cat.jpg", "dog.png"]
    assert files[0].mask_path == tmp_path / "cat-masklabel.png"
    assert files[1].mask_path is None


def test_kohya_folders_give_repeats_and_name(tmp_path):
    assert parse_kohya_folder("10_ohwx man") == (10, "ohwx man")
    assert parse_kohya_folder("ohwx") is None
    assert parse_kohya_folder("10") is None
    write_image(tmp_path / "10_ohwx man" / "a.png")
    write_image(tmp_path / "2_style" / "deeper" / "b.png")
    write_image(tmp_path / "plain" / "c.png")
    files = {f.rel: f for f in scan_images(tmp_path)}
    assert (files["10_ohwx man/a.png"].repeats, files["10_ohwx man/a.png"].folder_name) == (10, "ohwx man")
    assert files["2_style/deeper/b.png"].repeats == 2  # nearest kohya ancestor
    assert files["plain/c.png"].repeats is None
    # the scanned folder itself may be a kohya folder
    assert scan_images(tmp_path / "10_ohwx man")[0].repeats == 10


def test_missing_and_non_folder_name_the_path(tmp_path):
    with pytest.raises(DataError, match="does not exist") as e:
        scan_images(tmp_path / "nope")
    assert e.value.path.endswith("nope")
    f = write_image(tmp_path / "x.png")
    with pytest.raises(DataError, match="not a folder"):
        scan_images(f)


def test_corrupt_and_truncated_images_raise_naming_the_file(tmp_path):
    bad = tmp_path / "garbage.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    trunc = write_truncated_jpeg(tmp_path / "half.jpg")
    empty = tmp_path / "empty.webp"
    empty.write_bytes(b"")
    png = write_image(tmp_path / "full.png", (64, 64))
    trunc_png = tmp_path / "cut.png"
    trunc_png.write_bytes(png.read_bytes()[:-300])
    for path in (bad, trunc, empty, trunc_png):
        with pytest.raises(DataError) as e:
            verify_image(path)
        assert path.name in str(e.value) and "corrupt or truncated" in str(e.value)
        assert e.value.path == str(path)
    with pytest.raises(DataError, match="half.jpg"):
        open_image_rgb(trunc)
    # the header alone looks fine for a truncated JPEG: only full verification catches it
    assert verify_image(trunc, full=False) == (64, 64)


def test_missing_file_message(tmp_path):
    with pytest.raises(DataError, match="not found") as e:
        open_image_rgb(tmp_path / "gone.png")
    assert "gone.png" in str(e.value)


def test_exif_orientation_is_applied_to_size_and_pixels(tmp_path):
    arr = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 high; left half white
    arr[:, :20] = 255
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif, quality=100)
    assert read_image_size(path) == (20, 40)
    assert verify_image(path) == (20, 40)
    out = open_image_rgb(path)
    assert out.size == (20, 40)
    top = np.asarray(out)[:5].mean()
    bottom = np.asarray(out)[-5:].mean()
    assert top > 200 and bottom < 50  # the white left half is now on top


def test_modes_convert_to_rgb_sensibly(tmp_path):
    # 16-bit grayscale: mid-grey must stay mid-grey, not clip to white
    g16 = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    g16.save(tmp_path / "g16.png")
    rgb = open_image_rgb(tmp_path / "g16.png")
    assert rgb.mode == "RGB" and abs(int(np.asarray(rgb)[0, 0, 0]) - 128) <= 1
    # alpha: fully transparent pixels become white
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    rgba.save(tmp_path / "a.png")
    assert np.asarray(open_image_rgb(tmp_path / "a.png")).min() == 255
    # palette with a transparent index
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info["transparency"] = 0
    p.save(tmp_path / "p.png", transparency=0)
    assert np.asarray(open_image_rgb(tmp_path / "p.png")).min() == 255
    p2 = Image.new("P", (8, 8), 1)
    p2.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    p2.save(tmp_path / "p2.png")
    assert tuple(np.asarray(open_image_rgb(tmp_path / "p2.png"))[0, 0]) == (200, 100, 50)
    # grayscale
    Image.new("L", (8, 8), 77).save(tmp_path / "l.bmp")
    assert tuple(np.asarray(open_image_rgb(tmp_path / "l.bmp"))[0, 0]) == (77, 77, 77)


def test_draft_decodes_jpeg_at_reduced_scale_but_not_below_request(tmp_path):
    path = write_image(tmp_path / "big.jpg", size=(800, 600), fmt="JPEG")
    small = open_image_rgb(path, draft_size=(100, 75))
    assert small.size[0] >= 100 and small.size[1] >= 75 and small.size[0] < 800


def test_mask_opens_as_grayscale(tmp_path):
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "m.png")
    m = open_mask(tmp_path / "m.png")
    assert m.mode == "L" and np.asarray(m).min() == 255
