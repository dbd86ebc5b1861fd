import os

import numpy as np
import pytest
from PIL import Image

from npos.extract.datasets import (DataError, ImageDecodeError, decode_image,
                                   imagenet_class_names, load_image_source, read_class_names,
                                   readable_class_names)


def test_folder_rows_sorted_with_labels_from_sorted_folders(image_folder):
    (image_folder / "dog" / ".hidden.jpg").write_bytes(b"x")
    (image_folder / ".cache").mkdir()
    (image_folder / "cat" / "readme.txt").write_text("not an image extension")
    source = load_image_source(image_folder)
    assert source.classes == ["cat", "dog", "fox"]
    assert len(source) == 18
    assert source.ids == sorted(source.ids)
    assert "cat/nested/img003.png" in source.ids
    for row_id, label in zip(source.ids, source.labels):
        assert source.classes[label] == row_id.split("/")[0]
    assert source.path(0) == os.path.join(str(image_folder), source.ids[0])


def test_empty_class_folder_keeps_label_ids_aligned(image_folder):
    (image_folder / "bee").mkdir()
    source = load_image_source(image_folder)
    assert source.classes == ["bee", "cat", "dog", "fox"]
    assert set(source.labels.tolist()) == {1, 2, 3}


def test_classes_file_fixes_order_and_must_cover_folders(image_folder, tmp_path):
    order = tmp_path / "classes.txt"
    order.write_text("# my order\nfox\ncat\ndog\nwolf\n")
    source = load_image_source(image_folder, classes=order)
    assert source.classes == ["fox", "cat", "dog", "wolf"]
    assert source.labels[source.ids.index("fox/img000.jpg")] == 0
    order.write_text("cat\ndog\n")
    with pytest.raises(DataError, match="folder 'fox' .* is not in the classes list"):
        load_image_source(image_folder, classes=order)


def test_unlabeled_layouts(tmp_path, image_folder):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "a.png")
    source = load_image_source(flat)
    assert source.classes is None and source.labels.tolist() == [-1]
    source = load_image_source(image_folder, unlabeled=True)
    assert source.classes is None and (source.labels == -1).all() and len(source) == 18
    Image.new("RGB", (8, 8)).save(image_folder / "stray.png")
    with pytest.raises(DataError, match="class folders and also 1 images at its top level"):
        load_image_source(image_folder)


def test_no_images_is_an_error(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    (tmp_path / "empty" / "cat" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        load_image_source(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist"):
        load_image_source(tmp_path / "missing")


def test_txt_file_list_with_names_indices_and_tabs(tmp_path):
    (tmp_path / "list.txt").write_text(
        "# comment\nimgs/a.jpg dog\nimgs/b.jpg\tcat\nimgs/with space.jpg\tdog\n\nimgs/c.jpg\n")
    source = load_image_source(tmp_path / "list.txt")
    assert source.ids == ["imgs/a.jpg", "imgs/b.jpg", "imgs/with space.jpg", "imgs/c.jpg"]
    assert source.classes == ["cat", "dog"]
    assert source.labels.tolist() == [1, 0, 1, -1]
    assert source.root == str(tmp_path.resolve())

    (tmp_path / "ints.txt").write_text("a.jpg 2\nb.jpg 0\nc.jpg -1\n")
    source = load_image_source(tmp_path / "ints.txt")
    assert source.classes == ["0", "1", "2"] and source.labels.tolist() == [2, 0, -1]
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    source = load_image_source(tmp_path / "ints.txt", classes=tmp_path / "names.txt")
    assert source.classes == ["zero", "one", "two"]

    (tmp_path / "bad.txt").write_text("a b c\n")
    with pytest.raises(DataError, match="separate path and label with a tab"):
        load_image_source(tmp_path / "bad.txt")


def test_csv_file_list_and_unlabeled_list(tmp_path):
    (tmp_path / "list.csv").write_text("path,label\nx/1.png,bird\n/abs/2.png,cow\n")
    source = load_image_source(tmp_path / "list.csv")
    assert source.ids == ["x/1.png", "/abs/2.png"] and source.classes == ["bird", "cow"]
    assert source.path(1) == "/abs/2.png"
    (tmp_path / "plain.csv").write_text("x/1.png\nx/2.png\n")
    source = load_image_source(tmp_path / "plain.csv")
    assert source.classes is None and source.labels.tolist() == [-1, -1]
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(DataError, match="must end in .txt or .csv"):
        load_image_source(tmp_path / "list.json")


def test_fingerprint_follows_files_and_labels(image_folder, tmp_path):
    first = load_image_source(image_folder).fingerprint()
    assert load_image_source(image_folder).fingerprint() == first
    order = tmp_path / "classes.txt"
    order.write_text("dog\ncat\nfox\n")
    assert load_image_source(image_folder, classes=order).fingerprint() != first
    Image.new("RGB", (8, 8)).save(image_folder / "cat" / "new.png")
    assert load_image_source(image_folder).fingerprint() != first


def test_class_names_file_formats(tmp_path):
    (tmp_path / "names.txt").write_text(
        "n01440764 tench, Tinca tinca\ncat\tdomestic cat\n# skipped\n")
    mapping = read_class_names(tmp_path / "names.txt")
    assert mapping == {"n01440764": "tench, Tinca tinca", "cat": "domestic cat"}
    assert readable_class_names(["cat"], mapping) == ["domestic cat"]
    with pytest.raises(DataError, match="no name for class 'dog'"):
        readable_class_names(["cat", "dog"], mapping)
    (tmp_path / "broken.txt").write_text("lonelykey\n")
    with pytest.raises(DataError, match="expected 'key<TAB>name'"):
        read_class_names(tmp_path / "broken.txt")


def test_imagenet_wnids_are_the_1000_sorted_ids():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    mapping = imagenet_class_names()
    wnids = list(mapping)
    assert len(wnids) == 1000 == len(set(wnids))
    assert wnids == sorted(wnids)
    assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
    assert all(len(w) == 9 and w[0] == "n" and w[1:].isdigit() for w in wnids)
    assert list(mapping.values()) == list(IMAGENET_CLASSNAMES)
    assert mapping["n01440764"] == "tench" and mapping["n01443537"] == "goldfish"
    assert read_class_names("imagenet") == mapping


def test_decode_converts_every_mode(messy_folder):
    root, odd, _ = messy_folder
    for name, mode in odd.items():
        with Image.open(root / name) as raw:
            assert raw.mode == mode
        image = decode_image(str(root / name))
        assert image.mode == "RGB" and image.size == (40, 30), name
    # 16-bit values are scaled to 8 bits, not clipped to white.
    with Image.open(root / "dog/deep.png") as raw:
        deep = np.asarray(raw).astype(np.int64)
    np.testing.assert_array_equal(np.asarray(decode_image(str(root / "dog/deep.png")))[..., 0],
                                  deep >> 8)


def test_decode_failures_have_reasons(messy_folder, tmp_path):
    root, _, bad = messy_folder
    for name, reason in bad.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(str(root / name))
        assert info.value.reason.startswith(reason), (name, info.value.reason)
        assert repr(str(root / name)) in str(info.value)
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(str(tmp_path / "gone.jpg"))
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(ImageDecodeError, match="not a regular file"):
        decode_image(str(tmp_path / "pipe.jpg"))
