"""Small mask models built from their real code with random weights (nothing downloaded)."""
import json
from pathlib import Path

import torch


def tiny_sam() -> torch.nn.Module:
    """A ``segment_anything.modeling.Sam`` with the ViT-B layout shrunk (128 px input, width 32, one block)."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(0)
    encoder = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=32, depth=1, num_heads=2, out_chans=32,
                              global_attn_indexes=(0,), window_size=0)
    prompts = PromptEncoder(embed_dim=32, image_embedding_size=(8, 8), input_image_size=(128, 128), mask_in_chans=4)
    decoder = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=1, embedding_dim=32, mlp_dim=64, num_heads=2),
                          transformer_dim=32, iou_head_depth=1, iou_head_hidden_dim=16)
    return Sam(encoder, prompts, decoder, pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()


def clip_tokenizer_files(folder: Path) -> tuple[str, str]:
    """A character-level CLIP BPE vocabulary (vocab.json, merges.txt) for OWL-ViT's tokenizer."""
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [".", " "]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>", "!"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def tiny_owlvit(folder: Path):
    """(processor, model) of OWL-ViT with random weights and a tiny tokenizer."""
    from transformers import OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    image_processor = OwlViTImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    return _tiny_owl(folder, OwlViTConfig, OwlViTForObjectDetection, image_processor, OwlViTProcessor)


def tiny_owlv2(folder: Path):
    """(processor, model) of OWLv2 with random weights and a tiny tokenizer."""
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    return _tiny_owl(folder, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                     Owlv2Processor)


def _tiny_owl(folder: Path, config_class, model_class, image_processor, processor_class):
    """OWL-ViT and OWLv2 share their layout: a one-layer CLIP text and vision tower of width 32 on 64 px."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=16)
    config = config_class(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    model = model_class(config).eval()
    return processor_class(image_processor=image_processor, tokenizer=tokenizer), model


def tiny_grounding_dino(folder: Path):
    """(processor, model) of GroundingDINO (Swin image and BERT text backbones shrunk) with random weights."""
    from transformers import (BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection,
                              GroundingDinoImageProcessor, GroundingDinoProcessor, SwinConfig)

    tokenizer = bert_tokenizer(folder)
    config = GroundingDinoConfig(
        backbone_config=SwinConfig(image_size=64, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], window_size=2,
                                   out_features=["stage2", "stage3", "stage4"]),
        text_config=BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, max_position_embeddings=64),
        d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, fusion_dropout=0.0, num_queries=12, encoder_n_points=1,
        decoder_n_points=1, max_text_len=32)
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 128, "longest_edge": 192})  # 1x1 maps break GroupNorm
    return GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer), model


def bert_tokenizer(folder: Path):
    """GroundingDINO's BERT tokenizer with a small vocabulary: the words of the tests and single letters."""
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "man", "woman"] + [chr(c) for c in range(97, 123)]
    (folder / "vocab.txt").write_text("\n".join(words))
    return BertTokenizer(str(folder / "vocab.txt"))


def save_to_hf_cache(processor, model, model_id: str, cache_dir: Path, safetensors: bool = True) -> Path:
    """Save a (processor, model) where ``from_pretrained(model_id, cache_dir=cache_dir)`` finds it offline."""
    repo = cache_dir / ("models--" + model_id.replace("/", "--"))
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True, exist_ok=True)
    processor.save_pretrained(snapshot)
    model.save_pretrained(snapshot, safe_serialization=safetensors)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text("0" * 40)
    return snapshot


def tiny_clip(folder: Path) -> Path:
    """A random-weight CLIP (the OWL-ViT towers' size) saved with its processor in ``folder``, as ``from_pretrained`` reads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    folder.mkdir(parents=True, exist_ok=True)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    processor, model = _tiny_owl(folder, CLIPConfig, CLIPModel, image_processor, CLIPProcessor)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
