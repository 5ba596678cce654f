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
    from transformers import CLIPTokenizer, OwlViTConfig, OwlViTForObjectDetection, OwlViTImageProcessor, OwlViTProcessor

    vocab, merges = clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer(vocab, merges, pad_token="!", model_max_length=16)
    config = OwlViTConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=64, patch_size=16),
        projection_dim=32)
    torch.manual_seed(0)
    model = OwlViTForObjectDetection(config).eval()
    image_processor = OwlViTImageProcessor(size={"height": 64, "width": 64}, crop_size={"height": 64, "width": 64})
    return OwlViTProcessor(image_processor=image_processor, tokenizer=tokenizer), model
