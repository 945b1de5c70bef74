"""Does this transformers use the rollout's precomputed vision features? (5.17.0 ignores them without a word.)

    python bench/vision_features_check.py --model_dir /tmp/vf   # builds the tiny random model there once; ~10 s

rollout.py encodes the video once and hands the features to every later forward as `mm_encoder_outputs`.
Completion log-probs computed that way must equal a plain forward on the pixels; a transformers that drops
the features computes them blind to the media. Prints both gaps and exits 1 when the features are ignored.
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: E402

import gpu  # noqa: E402
import rollout  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True)
    a = p.parse_args()
    path = gpu.make_model_dir(Path(a.model_dir), gpu.TINY, torch.device("cpu"))
    processor = AutoProcessor.from_pretrained(path)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    batch, G, T = gpu.make_batch(processor, 4, (56, 56), (56, 56)), 2, 6
    with torch.no_grad():
        ro = rollout.generate_group(model, batch, G, processor, max_new_tokens=T, seeds=[0], min_new_tokens=T)
        features = rollout.completion_logprobs(model, ro, ro.mm)  # (G, T), the training path
        ids = torch.cat([batch["input_ids"].repeat(G, 1), ro.completion_ids], 1)
        mask = torch.cat([batch["attention_mask"].repeat(G, 1), ro.completion_mask], 1)
        media = {k: batch[k].repeat(G, *[1] * (batch[k].dim() - 1)) for k in
                 ("pixel_values", "pixel_values_videos", "image_grid_thw", "video_grid_thw")}
        media["mm_token_type_ids"] = torch.nn.functional.pad(batch["mm_token_type_ids"].repeat(G, 1), (0, T))

        def logprobs(**kw):  # (G, T) from a plain forward's logits
            logits = model(input_ids=ids, attention_mask=mask, **kw).logits[:, -T - 1:-1].float()
            return logits.log_softmax(-1).gather(-1, ro.completion_ids[..., None]).squeeze(-1)

        pixels, blind = logprobs(**media), logprobs()
    used, gap = (features - pixels).abs().max().item(), (blind - pixels).abs().max().item()
    print(f"transformers {transformers.__version__}: |features - pixels| {used:.2g}, |no media - pixels| {gap:.2g}")
    if used > 1e-4:
        sys.exit(f"transformers {transformers.__version__} ignores the precomputed vision features")


if __name__ == "__main__":
    main()
