"""Constants shared by data, model, tuners and evaluation."""

# Placeholder id written into input_ids for every image token. `<image>` in a conversation expands to exactly
# N copies (N = the vision encoder's token count). It is negative so it can never collide with a real vocabulary
# id; LlavaModel maps it to a valid id before the embedding lookup and then overwrites those embeddings with the
# connector outputs, so the LLM's embedding matrix is never resized.
IMAGE_TOKEN_INDEX = -200

# Label value ignored by the loss (PyTorch cross-entropy default).
IGNORE_INDEX = -100

# The literal marker that stands for the image in LLaVA-format conversations.
IMAGE_MARKER = "<image>"

# trainer.precision: auto = bf16 on GPU, fp32 on CPU (factory/train/engine.py select_dtype; checked by config_checks).
PRECISIONS = ("auto", "fp32", "bf16")
