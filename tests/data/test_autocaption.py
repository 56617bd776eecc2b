"""studio caption: a captioning model from a local folder writes kohya .txt sidecars; never a download."""

import pytest
import torch
from PIL import Image

from frontends.cli import main
from studio.data.autocaption import caption_folder
from studio.data.folder import scan_folder
from studio.errors import ConfigError, ModelLoadError

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "dog", "red", "moon", "shape"]


@pytest.fixture
def tiny_blip(tmp_path):
    """A random BLIP captioner with a 12-word vocabulary, saved as a user's local model folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    torch.manual_seed(0)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(WORDS))
    text = dict(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=37, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, sep_token_id=3,
                eos_token_id=3)
    vision = dict(hidden_size=32, image_size=32, patch_size=8, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=37)
    folder = tmp_path / "blip"
    config = BlipConfig(text_config=text, vision_config=vision, projection_dim=32)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=BertTokenizer(str(vocab), bos_token="[CLS]")).save_pretrained(folder)
    return folder


def test_captions_are_written_beside_uncaptioned_images(tmp_path, tiny_blip):
    images = tmp_path / "images"
    images.mkdir()
    for i, color in enumerate([(255, 0, 0), (0, 0, 255), (0, 255, 0)]):
        Image.new("RGB", (40, 48), color).save(images / f"{i}.png")
    (images / "2.txt").write_text("my own caption")
    written = caption_folder(images, tiny_blip, prefix="sks")
    assert [p.name for p in written] == ["0.txt", "1.txt"]
    for path in written:
        prefix, _, text = path.read_text().partition(", ")
        assert prefix == "sks" and text and set(text.split()) <= set(WORDS[5:])
    assert (images / "2.txt").read_text() == "my own caption"  # kept
    assert [item.caption.startswith("sks, ") for item in scan_folder(images)] == [True, True, False]
    assert main(["caption", str(images), "--model", str(tiny_blip), "--overwrite", "--caption_extension",
                 "caption"]) == 0
    assert sorted(p.name for p in images.glob("*.caption")) == ["0.caption", "1.caption", "2.caption"]


def test_no_model_or_a_folder_without_one_is_a_clear_error(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError, match="captioning needs --model DIR: a captioning model you have on disk"):
        caption_folder(tmp_path / "images", None)
    with pytest.raises(ModelLoadError, match="no captioning model in"):
        caption_folder(tmp_path / "images", tmp_path / "images")
